"""``upstreams:`` and ``ext_authz:`` (sidecar/config/upstreams.py): which route an Envoy check
request picks from its Host and path (``ExtAuthzRoute.matches``, ``ExtAuthzConfig.route_for``),
what an upstream's credentials may be, and the checks ``Settings`` makes of both sections."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from sidecar.config import ConfigError, format_validation_error, settings_from_mapping
from sidecar.config.upstreams import (
    BearerCredential,
    ClientCredentialsCredential,
    ExtAuthzConfig,
    ExtAuthzRoute,
    HeaderCredential,
    UpstreamConfig,
)

CODE_SEARCH = "https://code-search.internal/mcp"
CODE_SEARCH_ADMIN = "https://code-search.internal/admin"
VENDOR = "https://vendor.example/api"
ANY_VENDOR = "https://vendors.example/"
API_KEY = "api-key-" + "k" * 24


def refusal(model: type[BaseModel], **values: Any) -> str:
    """The error text of validating ``values`` as ``model``, each line led by its key path."""
    with pytest.raises(ValidationError) as caught:
        model.model_validate(values)
    return format_validation_error(caught.value)


def refused(config: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(config, env={})
    return str(caught.value)


def route(host: str, path_prefix: str | None = None) -> ExtAuthzRoute:
    """A route to CODE_SEARCH; without ``path_prefix``, the model's default."""
    values = {"host": host, "audience": CODE_SEARCH}
    if path_prefix is not None:
        values["path_prefix"] = path_prefix
    return ExtAuthzRoute.model_validate(values)


def ext_authz(*routes: dict[str, Any]) -> ExtAuthzConfig:
    return ExtAuthzConfig.model_validate(
        {"listen": "127.0.0.1:9191", "client_id": "gateway", "routes": list(routes)}
    )


def audience_for(config: ExtAuthzConfig, host: str, path: str) -> str | None:
    route = config.route_for(host, path)
    return None if route is None else route.audience


# --- ExtAuthzRoute.matches: the host ------------------------------------------------------------


def test_an_exact_host_matches_itself_whatever_its_case() -> None:
    exact = route("Code-Search.Internal")

    assert exact.host == "code-search.internal"
    assert exact.matches("code-search.internal", "/")
    assert exact.matches("CODE-SEARCH.internal", "/")


@pytest.mark.parametrize("host", ["search.internal", "x.code-search.internal", "code-search"])
def test_an_exact_host_matches_no_other_name(host: str) -> None:
    assert not route("code-search.internal").matches(host, "/")


@pytest.mark.parametrize(
    "host", ["api.vendors.example", "a.b.vendors.example", "API.Vendors.example"]
)
def test_a_wildcard_host_matches_names_under_its_suffix(host: str) -> None:
    assert route("*.vendors.example").matches(host, "/")


@pytest.mark.parametrize(
    "host", ["vendors.example", ".vendors.example", "evilvendors.example", "vendors.example.evil"]
)
def test_a_wildcard_host_does_not_match_the_bare_suffix_nor_a_lookalike(host: str) -> None:
    assert not route("*.vendors.example").matches(host, "/")


# --- ExtAuthzRoute.matches: the path ------------------------------------------------------------


@pytest.mark.parametrize("path", ["/mcp", "/mcp/", "/mcp/tools", "/mcp/tools/call"])
def test_a_path_prefix_matches_itself_and_the_paths_below_it(path: str) -> None:
    assert route("h", "/mcp").matches("h", path)


@pytest.mark.parametrize("path", ["/mcpx", "/mcp-admin", "/", "/other/mcp", "/MCP"])
def test_a_path_prefix_stops_at_a_segment_boundary(path: str) -> None:
    assert not route("h", "/mcp").matches("h", path)


@pytest.mark.parametrize(("path", "matched"), [("/mcp", True), ("/mcp/x", True), ("/mcpx", False)])
def test_a_path_prefix_with_a_trailing_slash_is_the_same_segment(path: str, matched: bool) -> None:
    assert route("h", "/mcp/").matches("h", path) is matched


@pytest.mark.parametrize("path", ["/", "/anything", "/a/b?c"])
def test_the_default_path_prefix_matches_every_path(path: str) -> None:
    assert route("h").matches("h", path)


def test_a_route_matches_only_when_both_host_and_path_do() -> None:
    mcp = route("h", "/mcp")

    assert not mcp.matches("other", "/mcp")
    assert not mcp.matches("h", "/api")


@pytest.mark.parametrize("prefix", ["mcp", "", "https://h/mcp"])
def test_a_route_path_prefix_starts_with_a_slash(prefix: str) -> None:
    message = refusal(ExtAuthzRoute, host="h", path_prefix=prefix, audience=CODE_SEARCH)

    assert message.startswith("path_prefix: ")


# --- ExtAuthzConfig.route_for -------------------------------------------------------------------


@pytest.mark.parametrize("host", ["code-search.internal:10000", "code-search.internal:80"])
def test_the_port_in_host_is_ignored(host: str) -> None:
    config = ext_authz({"host": "code-search.internal", "audience": CODE_SEARCH})

    assert audience_for(config, host, "/mcp") == CODE_SEARCH


def test_the_port_in_host_is_ignored_for_a_wildcard_route() -> None:
    config = ext_authz({"host": "*.vendors.example", "audience": ANY_VENDOR})

    assert audience_for(config, "api.vendors.example:10000", "/v1") == ANY_VENDOR


@pytest.mark.parametrize("host", ["[::1]:10000", "[::1]", "::1"])
def test_an_ipv6_literal_host_matches_with_or_without_brackets_and_port(host: str) -> None:
    config = ext_authz({"host": "::1", "audience": CODE_SEARCH})

    assert audience_for(config, host, "/") == CODE_SEARCH


def test_an_ipv6_literal_does_not_match_another_address() -> None:
    config = ext_authz({"host": "::1", "audience": CODE_SEARCH})

    assert audience_for(config, "[::2]:10000", "/") is None


def test_the_longest_path_prefix_wins_whatever_the_order_of_the_routes() -> None:
    config = ext_authz(
        {"host": "code-search.internal", "audience": "https://code-search.internal/"},
        {
            "host": "code-search.internal",
            "path_prefix": "/mcp/admin",
            "audience": CODE_SEARCH_ADMIN,
        },
        {"host": "code-search.internal", "path_prefix": "/mcp", "audience": CODE_SEARCH},
    )

    assert audience_for(config, "code-search.internal", "/mcp/admin/x") == CODE_SEARCH_ADMIN
    assert audience_for(config, "code-search.internal", "/mcp/tools") == CODE_SEARCH
    assert audience_for(config, "code-search.internal", "/mcpx") == "https://code-search.internal/"


def test_an_exact_host_beats_a_wildcard_one() -> None:
    config = ext_authz(
        {"host": "*.vendors.example", "path_prefix": "/api/v1", "audience": ANY_VENDOR},
        {"host": "special.vendors.example", "audience": VENDOR},
    )

    assert audience_for(config, "special.vendors.example", "/api/v1/x") == VENDOR
    assert audience_for(config, "other.vendors.example", "/api/v1/x") == ANY_VENDOR


def test_no_route_for_an_unknown_host_or_path() -> None:
    config = ext_authz(
        {"host": "code-search.internal", "path_prefix": "/mcp", "audience": CODE_SEARCH}
    )

    assert config.route_for("vendor.example", "/mcp") is None
    assert config.route_for("code-search.internal", "/api") is None
    assert config.route_for("", "/mcp") is None


def test_two_routes_for_the_same_host_and_prefix_are_refused() -> None:
    route = {"host": "code-search.internal", "path_prefix": "/mcp", "audience": CODE_SEARCH}
    twice = [route, {**route, "host": "CODE-SEARCH.internal", "audience": CODE_SEARCH_ADMIN}]

    message = refusal(ExtAuthzConfig, listen="127.0.0.1:9191", client_id="gateway", routes=twice)

    assert "appears twice" in message


def test_ext_authz_needs_a_route() -> None:
    message = refusal(ExtAuthzConfig, listen="127.0.0.1:9191", client_id="gateway", routes=[])

    assert message.startswith("routes: ")


@pytest.mark.parametrize("prefix", ["ext_authz", "/ext_authz?x=1", "/ext_authz#f"])
def test_the_envoy_path_prefix_is_a_bare_path(prefix: str) -> None:
    routes = [{"host": "h", "audience": CODE_SEARCH}]
    message = refusal(
        ExtAuthzConfig,
        listen="127.0.0.1:9191",
        client_id="gateway",
        path_prefix=prefix,
        routes=routes,
    )

    assert message.startswith("path_prefix: ")


@pytest.mark.parametrize("listen", ["9191", "127.0.0.1", "::1:9191"])
def test_the_ext_authz_listener_is_host_colon_port(listen: str) -> None:
    routes = [{"host": "h", "audience": CODE_SEARCH}]
    message = refusal(ExtAuthzConfig, listen=listen, client_id="gateway", routes=routes)

    assert message.startswith("listen: ")


# --- UpstreamConfig -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("credentials", "kind", "mode"),
    [
        ({"type": "bearer", "token": API_KEY}, BearerCredential, "static"),
        ({"type": "header", "header": "X-API-Key", "token": API_KEY}, HeaderCredential, "static"),
        (
            {
                "type": "client_credentials",
                "token_url": "https://auth.vendor.example/oauth/token",
                "client_id": "sidecar",
                "client_secret": "upstream-secret",
            },
            ClientCredentialsCredential,
            "client_credentials",
        ),
    ],
)
def test_the_credential_type_picks_its_model_and_mode(
    credentials: dict[str, Any], kind: type[BaseModel], mode: str
) -> None:
    upstream = UpstreamConfig.model_validate({"name": "vendor", "credentials": credentials})

    assert isinstance(upstream.credentials, kind)
    assert upstream.mode == mode


@pytest.mark.parametrize(
    "credentials",
    [
        {"type": "bearer", "header": "X-API-Key", "token": API_KEY},  # a field of another type
        {"type": "header", "token": API_KEY},  # the header is missing
        {"type": "client_credentials", "token": API_KEY},
        {"type": "basic", "token": API_KEY},
        {"token": API_KEY},
    ],
)
def test_credentials_that_do_not_fit_their_type_are_refused(credentials: dict[str, Any]) -> None:
    message = refusal(UpstreamConfig, name="vendor", credentials=credentials)

    assert message.startswith("credentials")
    assert API_KEY not in message


@pytest.mark.parametrize(
    "header",
    [
        "Host",
        "host",
        "Content-Length",
        "Transfer-Encoding",
        "Connection",
        "Cookie",
        "Proxy-Authorization",
        "X Bad",
        "X-Key:",
        "X-Kéy",
        "",
    ],
)
def test_a_header_that_cannot_carry_a_credential_is_refused(header: str) -> None:
    credentials = {"type": "header", "header": header, "token": API_KEY}

    message = refusal(UpstreamConfig, name="vendor", credentials=credentials)

    assert message.startswith("credentials.header.header: ")
    assert API_KEY not in message


@pytest.mark.parametrize("header", ["X-API-Key", "api_key", "X-Goog-Api-Key"])
def test_a_header_of_its_own_is_a_token(header: str) -> None:
    credentials = {"type": "header", "header": header, "token": API_KEY}

    upstream = UpstreamConfig.model_validate({"name": "vendor", "credentials": credentials})

    assert isinstance(upstream.credentials, HeaderCredential)
    assert upstream.credentials.header == header


def test_an_empty_key_is_refused() -> None:
    message = refusal(UpstreamConfig, name="vendor", credentials={"type": "bearer", "token": ""})

    assert message.startswith("credentials.bearer.token: ")


def test_the_key_is_kept_secret_in_the_model() -> None:
    upstream = UpstreamConfig.model_validate(
        {"name": "vendor", "credentials": {"type": "bearer", "token": API_KEY}}
    )

    assert API_KEY not in repr(upstream)
    assert API_KEY not in str(upstream.model_dump())


@pytest.mark.parametrize("name", ["", "-vendor", "vendor key", "v" * 65, "vendor/key"])
def test_an_upstream_name_is_a_short_plain_word(name: str) -> None:
    message = refusal(UpstreamConfig, name=name, credentials={"type": "bearer", "token": API_KEY})

    assert message.startswith("name: ")


@pytest.mark.parametrize("url", ["ftp://vendor.example/", "http://vendor.example/mcp", "/mcp"])
def test_an_upstream_url_is_https_or_loopback(url: str) -> None:
    message = refusal(
        UpstreamConfig, name="vendor", url=url, credentials={"type": "bearer", "token": API_KEY}
    )

    assert message.startswith("url: ")


# --- Settings: upstreams and ext_authz together with the rest ------------------------------------


def with_upstreams(config: dict[str, Any], *names: str) -> dict[str, Any]:
    config["upstreams"] = [
        {"name": name, "credentials": {"type": "bearer", "token": API_KEY}} for name in names
    ]
    return config


def with_ext_authz(config: dict[str, Any], **values: Any) -> dict[str, Any]:
    config["ext_authz"] = {
        "listen": "127.0.0.1:9191",
        "client_id": "gateway",
        "path_prefix": "/ext_authz",
        "routes": [
            {"host": "code-search.internal", "path_prefix": "/mcp", "audience": CODE_SEARCH}
        ],
        **values,
    }
    return config


def test_distinct_upstreams_are_accepted(config: dict[str, Any]) -> None:
    settings = settings_from_mapping(with_upstreams(config, "vendor", "vendor-search"), env={})

    assert [u.name for u in settings.upstreams] == ["vendor", "vendor-search"]


def test_two_upstreams_of_one_name_are_refused(config: dict[str, Any]) -> None:
    message = refused(with_upstreams(config, "vendor", "other", "vendor"))

    assert message == "upstreams: 'vendor' appears twice"
    assert API_KEY not in message


def test_an_ext_authz_section_is_accepted(config: dict[str, Any]) -> None:
    settings = settings_from_mapping(with_ext_authz(config), env={})

    assert settings.ext_authz is not None
    assert settings.ext_authz.client_id == "gateway"
    assert settings.ext_authz.path_prefix == "/ext_authz"


def test_ext_authz_for_a_client_not_configured_is_refused(config: dict[str, Any]) -> None:
    message = refused(with_ext_authz(config, client_id="envoy"))

    assert message == "ext_authz.client_id is not one of the configured clients"


def test_ext_authz_on_the_management_port_is_refused(config: dict[str, Any]) -> None:
    config["management"] = {"listen": "127.0.0.1:9191"}

    assert refused(with_ext_authz(config)) == "ext_authz.listen must use a port of its own"


def test_ext_authz_on_the_admin_port_is_refused(config: dict[str, Any]) -> None:
    config["admin"] = {
        "listen": "0.0.0.0:9191",
        "credentials": [{"name": "ops", "token": "admin-token-" + "t" * 24}],
    }

    assert refused(with_ext_authz(config)) == "ext_authz.listen must use a port of its own"


def test_ext_authz_beside_admin_and_management_on_ports_of_their_own_is_accepted(
    config: dict[str, Any],
) -> None:
    config["management"] = {"listen": "127.0.0.1:9090"}
    config["admin"] = {
        "listen": "127.0.0.1:9901",
        "credentials": [{"name": "ops", "token": "admin-token-" + "t" * 24}],
    }

    assert settings_from_mapping(with_ext_authz(config), env={}).ext_authz is not None


def test_an_ext_authz_error_names_its_key_path(config: dict[str, Any]) -> None:
    message = refused(with_ext_authz(config, routes=[{"host": "h", "audience": ""}]))

    assert message.startswith("ext_authz.routes[0].audience: ")


@pytest.mark.parametrize(
    "host", ["vendor.example:10000", "[::1]", "*foo.example", "https://vendor.example", "a..b", ""]
)
def test_a_route_host_that_could_never_match_is_refused(host: str) -> None:
    with pytest.raises(ValidationError, match="host"):
        ExtAuthzConfig.model_validate(
            {
                "listen": "127.0.0.1:9191",
                "client_id": "gateway",
                "routes": [{"host": host, "audience": "https://a.example"}],
            }
        )


@pytest.mark.parametrize("listen", ["0.0.0.0:9191", "10.0.0.5:9191", "[::]:9191"])
def test_ext_authz_off_loopback_needs_a_secret(config: dict[str, Any], listen: str) -> None:
    message = refused(with_ext_authz(config, listen=listen))

    assert "set ext_authz.secret" in message


def test_ext_authz_off_loopback_with_a_secret_is_accepted(config: dict[str, Any]) -> None:
    secret = "envoy-proof-" + "e" * 20
    settings = settings_from_mapping(
        with_ext_authz(config, listen="0.0.0.0:9191", secret=secret), env={}
    )

    assert settings.ext_authz is not None
    assert secret not in repr(settings)


@pytest.mark.parametrize("token", ["key\n", "ke\r\ny", " key", "key ", "k\x00ey", "kéy"])
def test_a_static_key_that_cannot_go_into_a_header_is_refused(token: str) -> None:
    for credentials in (
        {"type": "bearer", "token": token},
        {"type": "header", "header": "X-API-Key", "token": token},
    ):
        message = refusal(UpstreamConfig, name="v", credentials=credentials)

        assert "visible ASCII" in message
        assert token.strip() not in message or token.strip() == ""


def test_a_resource_audience_for_client_credentials_must_be_an_absolute_uri(
    config: dict[str, Any],
) -> None:
    config["upstreams"] = [
        {
            "name": "saas",
            "credentials": {
                "type": "client_credentials",
                "token_url": "https://auth.saas.example/token",
                "client_id": "sidecar",
                "client_secret": "s" * 24,
            },
        }
    ]
    config["policies"] = [
        {
            "client_id": "gateway",
            "audience": "saas-api",
            "scopes": ["s.read"],
            "credential": "client_credentials",
            "upstream": "saas",
        }
    ]

    assert "RFC 8707" in refused(config)
    config["upstreams"][0]["credentials"]["audience_parameter"] = "audience"
    assert settings_from_mapping(config, env={}).policies[0].audience == "saas-api"
