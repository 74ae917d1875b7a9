"""Envoy's ``ext_authz`` check endpoint (sidecar/web/ext_authz.py) in-process: the app of the
ext_authz listener (``create_app(settings, listener="ext_authz")``) through Flask's test client,
over a real SQLite database. Each check request is what Envoy's HTTP service sends:
``path_prefix`` + the original path, the original method and Host, the user's Authorization.

- Envoy takes exactly ``200`` as "allowed" and copies ``authorization`` / the API key's header
  onto the upstream request; ``x-envoy-auth-headers-to-remove`` drops the user's token;
- every refusal is a fixed body: ``401`` (RFC 6750 §3.1, ``WWW-Authenticate: Bearer``),
  ``403``, ``429`` (RFC 6585 §4, ``Retry-After``) or ``503``; the mapping of the exchange's
  OAuth errors onto these (``STATUS_OF_ERROR``) is tested one error at a time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from sidecar.config import settings_from_mapping
from sidecar.errors import (
    InvalidClientError,
    InvalidRequestError,
    InvalidScopeError,
    InvalidTargetError,
    ProtocolError,
    RateLimitedError,
    ServerError,
    TemporarilyUnavailableError,
    UnauthorizedClientError,
    UnsupportedGrantTypeError,
)
from sidecar.services import Services
from sidecar.web.app import create_app
from sidecar.web.ext_authz import DENIED, REMOVE_HEADERS, STATUS_OF_ERROR, _status_of
from tests.conftest import (
    CODE_SEARCH,
    DISABLED,
    SIDECAR_ISSUER,
    ConfigEdit,
    TestIdP,
    audit_rows,
    make_services,
)

VENDOR = "https://vendor.example/api"
BEARER_VENDOR = "https://api.bearer-vendor.example/v1"
RAW_VENDOR = "https://raw.example/api"
NO_POLICY = "https://no-policy.internal/mcp"
VENDOR_KEY = "vendor-key-" + "v" * 24
BEARER_KEY = "bearer-key-" + "b" * 24
RAW_KEY = "Token raw-key-" + "r" * 24

FIXED_BODIES = {
    401: {"error": "invalid_token", "error_description": "A valid bearer token is required."},
    403: {"error": "access_denied", "error_description": "Not allowed by policy."},
    429: {"error": "rate_limited", "error_description": "Too many requests."},
    503: {"error": "temporarily_unavailable", "error_description": "Try again later."},
}


def upstream(name: str, credentials: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "credentials": credentials}


def static_policy(audience: str, name: str) -> dict[str, Any]:
    return {
        "client_id": "gateway",
        "audience": audience,
        "scopes": ["api"],
        "default_scopes": ["api"],
        "ttl": 60,
        "credential": "static",
        "upstream": name,
    }


def with_ext_authz(config: dict[str, Any]) -> dict[str, Any]:
    config["upstreams"] = [
        upstream("vendor", {"type": "header", "header": "X-API-Key", "token": VENDOR_KEY}),
        upstream("bearer-vendor", {"type": "bearer", "token": BEARER_KEY}),
        upstream("raw", {"type": "header", "header": "Authorization", "token": RAW_KEY}),
    ]
    config["policies"] += [
        static_policy(VENDOR, "vendor"),
        static_policy(BEARER_VENDOR, "bearer-vendor"),
        static_policy(RAW_VENDOR, "raw"),
    ]
    config["ext_authz"] = {
        "listen": "127.0.0.1:9191",
        "client_id": "gateway",
        "path_prefix": "/ext_authz",
        "routes": [
            {"host": "code-search.internal", "path_prefix": "/mcp", "audience": CODE_SEARCH},
            {
                "host": "code-search.internal",
                "path_prefix": "/admin",
                "audience": CODE_SEARCH,
                "scope": ["code.admin"],  # a scope the policy does not allow
            },
            {"host": "vendor.example", "audience": VENDOR},
            {"host": "*.bearer-vendor.example", "audience": BEARER_VENDOR},
            {"host": "raw.example", "audience": RAW_VENDOR},
            {"host": "no-policy.internal", "audience": NO_POLICY},
            {"host": "disabled.internal", "audience": DISABLED},
        ],
    }
    return config


@pytest.fixture(scope="module")
def edit_config() -> ConfigEdit:
    return with_ext_authz


@pytest.fixture
def client(services: Services) -> FlaskClient:
    """The ext_authz listener's app, as ``sidecar serve`` builds it for that listener."""
    return create_app(services.settings, services, listener="ext_authz").test_client()


@pytest.fixture
def client_for(config: dict[str, Any]) -> Iterator[Callable[[ConfigEdit], FlaskClient]]:
    """The ext_authz listener's app for ``config`` as an edit changes it, on a service of its
    own (closed at the end)."""
    built: list[Services] = []

    def build(edit: ConfigEdit) -> FlaskClient:
        services = make_services(settings_from_mapping(edit(config), env={}))
        built.append(services)
        return create_app(services.settings, services, listener="ext_authz").test_client()

    yield build
    for services in built:
        services.close()


def check(
    client: FlaskClient,
    host: str,
    path: str,
    authorization: str | None = None,
    method: str = "GET",
) -> TestResponse:
    """What Envoy sends for ``method host path``: path_prefix + path, Host, Authorization."""
    headers = {"Host": host}
    if authorization is not None:
        headers["Authorization"] = authorization
    return client.open("/ext_authz" + path, method=method, headers=headers)


def assert_denied(response: TestResponse, status: int, *never_echoed: str) -> None:
    """The fixed refusal for ``status``: no credential, nothing of the request."""
    assert response.status_code == status
    assert response.mimetype == "application/json"
    assert json.loads(response.get_data()) == FIXED_BODIES[status]
    assert response.headers["Cache-Control"] == "no-store"
    assert int(response.headers["Content-Length"]) == len(response.get_data())
    assert "Authorization" not in response.headers
    assert "X-API-Key" not in response.headers
    text = response.get_data(as_text=True) + str(response.headers)
    for value in (VENDOR_KEY, BEARER_KEY, RAW_KEY, *never_echoed):
        assert value not in text


def expired(idp: TestIdP) -> str:
    now = int(time.time())
    return idp.token(iat=now - 900, exp=now - 300)  # well past the 30 s leeway


# --- the status of each refusal -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidRequestError(), 401),  # the user's token: missing, malformed, expired, unknown
        (InvalidClientError(), 503),  # ext_authz.client_id misconfigured: not the user's fault
        (UnauthorizedClientError(), 403),
        (InvalidTargetError(), 403),
        (InvalidScopeError(), 403),
        (TemporarilyUnavailableError(), 503),
        (RateLimitedError(), 429),
        (ServerError(), 503),
        (UnsupportedGrantTypeError(), 403),  # not in the table: a 4xx is a refusal
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, ProtocolError) else str(value),
)
def test_each_exchange_error_has_its_status(error: ProtocolError, status: int) -> None:
    assert _status_of(error) == status


def test_every_status_of_the_table_has_a_fixed_body() -> None:
    assert set(STATUS_OF_ERROR.values()) | {429} <= set(DENIED)
    assert DENIED == FIXED_BODIES


# --- allowed --------------------------------------------------------------------------------


def test_a_minted_token_is_the_upstream_authorization(
    client: FlaskClient, services: Services, idp: TestIdP
) -> None:
    user_token = idp.token(sub="alice@example.com", email="alice@example.com")

    response = check(client, "code-search.internal", "/mcp/tools", f"Bearer {user_token}")

    assert response.status_code == 200
    assert response.get_data() == b""
    assert response.headers["Cache-Control"] == "no-store"
    assert REMOVE_HEADERS not in response.headers
    scheme, minted = response.headers["Authorization"].split(" ")
    assert scheme == "Bearer"
    keys = jwt.PyJWKSet.from_dict(services.keyring.get().jwks(services.clock()))
    kid = jwt.get_unverified_header(minted)["kid"]
    claims = jwt.decode(
        minted, keys[kid].key, algorithms=["ES256"], audience=CODE_SEARCH, issuer=SIDECAR_ISSUER
    )
    assert (claims["sub"], claims["client_id"], claims["scope"]) == (
        "alice@example.com",
        "gateway",
        "code.read",
    )
    assert user_token not in str(response.headers)


def test_a_key_in_a_header_of_its_own_comes_with_the_removal_of_authorization(
    client: FlaskClient, idp: TestIdP
) -> None:
    user_token = idp.token()

    response = check(client, "vendor.example", "/api/items", f"Bearer {user_token}")

    assert response.status_code == 200
    assert response.headers["X-API-Key"] == VENDOR_KEY
    assert response.headers[REMOVE_HEADERS] == "authorization"
    assert "Authorization" not in response.headers
    assert user_token not in str(response.headers)


def test_a_bearer_key_replaces_the_users_authorization(client: FlaskClient, idp: TestIdP) -> None:
    response = check(client, "eu.bearer-vendor.example", "/v1", f"Bearer {idp.token()}")

    assert response.status_code == 200
    assert response.headers["Authorization"] == f"Bearer {BEARER_KEY}"
    assert REMOVE_HEADERS not in response.headers


def test_a_key_whose_header_is_authorization_is_not_removed_again(
    client: FlaskClient, idp: TestIdP
) -> None:
    # Envoy removes the listed headers after it sets the allowed ones: "authorization" there
    # would drop the key itself.
    response = check(client, "raw.example", "/api", f"Bearer {idp.token()}")

    assert response.status_code == 200
    assert response.headers["Authorization"] == RAW_KEY
    assert REMOVE_HEADERS not in response.headers


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_any_method_is_checked_alike(client: FlaskClient, idp: TestIdP, method: str) -> None:
    response = check(client, "vendor.example", "/api", f"Bearer {idp.token()}", method=method)

    assert response.status_code == 200
    assert response.headers["X-API-Key"] == VENDOR_KEY


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_bearer_scheme_is_case_insensitive(
    client: FlaskClient, idp: TestIdP, scheme: str
) -> None:
    response = check(client, "vendor.example", "/", f"{scheme} {idp.token()}")

    assert response.status_code == 200


def test_a_grant_is_audited_for_the_ext_authz_client_and_the_routes_audience(
    client: FlaskClient, services: Services, idp: TestIdP
) -> None:
    check(client, "vendor.example", "/api", f"Bearer {idp.token(sub='bob@example.com')}")

    [row] = audit_rows(services)
    assert (row.decision, row.client_id, row.subject) == ("granted", "gateway", "bob@example.com")
    assert json.loads(row.audiences or "[]") == [VENDOR]
    assert row.reason == "static credential of upstream vendor"


# --- 401: no usable user token ----------------------------------------------------------------


def test_no_authorization_is_a_401_with_a_bearer_challenge(
    client: FlaskClient, services: Services
) -> None:
    response = check(client, "code-search.internal", "/mcp")

    assert_denied(response, 401)
    # RFC 6750 §3.1: no error code when the request carried no token at all.
    assert response.headers["WWW-Authenticate"] == "Bearer"
    [row] = audit_rows(services)
    assert (row.decision, row.error, row.client_id) == ("denied", "invalid_request", "gateway")
    assert json.loads(row.audiences or "[]") == [CODE_SEARCH]


@pytest.mark.parametrize(
    ("authorization", "credentials"),
    [
        ("Basic Z2F0ZXdheTpzZWNyZXQ=", "Z2F0ZXdheTpzZWNyZXQ="),
        ("Bearer", None),
        ("Bearer ", None),
        ("Bearer a.b.c d", "a.b.c d"),
        ("Bearer a.b,c", "a.b,c"),
        ("Bearera.b.c", "a.b.c"),
        ("Token a.b.c", "a.b.c"),
        ("Bearer a.b.c, Bearer d.e.f", "d.e.f"),  # two Authorization headers, as Envoy joins them
    ],
)
def test_a_malformed_authorization_is_a_401(
    client: FlaskClient, authorization: str, credentials: str | None
) -> None:
    response = check(client, "code-search.internal", "/mcp", authorization)

    assert_denied(response, 401, *([credentials] if credentials else []))
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_an_expired_user_token_is_a_401(client: FlaskClient, idp: TestIdP) -> None:
    user_token = expired(idp)

    response = check(client, "code-search.internal", "/mcp", f"Bearer {user_token}")

    assert_denied(response, 401, user_token)


def test_a_token_that_is_not_a_jwt_is_a_401(client: FlaskClient) -> None:
    response = check(client, "code-search.internal", "/mcp", "Bearer opaque-token-123")

    assert_denied(response, 401, "opaque-token-123")


def test_a_token_of_an_untrusted_issuer_is_a_401(client: FlaskClient, idp: TestIdP) -> None:
    user_token = idp.token(iss="https://evil.example")

    response = check(client, "code-search.internal", "/mcp", f"Bearer {user_token}")

    assert_denied(response, 401, user_token, "evil.example")


# --- 403: refused by policy, or no route ---------------------------------------------------------


def test_a_scope_the_policy_does_not_allow_is_a_403(
    client: FlaskClient, services: Services, idp: TestIdP
) -> None:
    user_token = idp.token()

    response = check(client, "code-search.internal", "/admin/users", f"Bearer {user_token}")

    assert_denied(response, 403, user_token, "code.admin", "/admin/users")
    [row] = audit_rows(services)
    assert (row.decision, row.error, row.client_id) == ("denied", "invalid_scope", "gateway")


@pytest.mark.parametrize("host", ["no-policy.internal", "disabled.internal"])
def test_an_audience_without_an_enabled_policy_is_a_403(
    client: FlaskClient, idp: TestIdP, host: str
) -> None:
    user_token = idp.token()

    response = check(client, host, "/mcp", f"Bearer {user_token}")

    assert_denied(response, 403, user_token, host)


@pytest.mark.parametrize(
    ("host", "path"),
    [
        ("unknown.example", "/mcp"),
        ("code-search.internal", "/other"),
        ("code-search.internal", "/mcpx"),
        ("bearer-vendor.example", "/v1"),  # the wildcard's bare suffix
    ],
)
def test_a_host_and_path_without_a_route_is_a_403(
    client: FlaskClient, services: Services, idp: TestIdP, host: str, path: str
) -> None:
    user_token = idp.token()

    response = check(client, host, path, f"Bearer {user_token}")

    assert_denied(response, 403, user_token, host, path)
    [row] = audit_rows(services)
    assert (row.decision, row.error, row.client_id) == ("denied", "invalid_target", "gateway")


def test_a_refused_client_is_a_403(
    client_for: Callable[[ConfigEdit], FlaskClient], idp: TestIdP
) -> None:
    def envoy_as_no_exchange(config: dict[str, Any]) -> dict[str, Any]:
        config["ext_authz"]["client_id"] = "no-exchange"  # may not use token exchange
        return config

    response = check(
        client_for(envoy_as_no_exchange), "code-search.internal", "/mcp", f"Bearer {idp.token()}"
    )

    assert_denied(response, 403)


# --- path_prefix ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/mcp", "/ext_authzmcp", "/ext_authz_x/mcp", "/token", "/"])
def test_a_path_outside_the_prefix_is_a_403(client: FlaskClient, idp: TestIdP, path: str) -> None:
    user_token = idp.token()

    response = client.get(
        path, headers={"Host": "vendor.example", "Authorization": f"Bearer {user_token}"}
    )

    assert_denied(response, 403, user_token)


@pytest.mark.parametrize("path", ["/ext_authz", "/ext_authz/"])
def test_the_prefix_alone_is_the_root_path(client: FlaskClient, idp: TestIdP, path: str) -> None:
    response = client.get(
        path, headers={"Host": "vendor.example", "Authorization": f"Bearer {idp.token()}"}
    )

    assert response.status_code == 200
    assert response.headers["X-API-Key"] == VENDOR_KEY


def test_the_query_string_does_not_take_part_in_the_route(
    client: FlaskClient, idp: TestIdP
) -> None:
    response = client.get(
        "/ext_authz/mcp?next=/admin",
        headers={"Host": "code-search.internal", "Authorization": f"Bearer {idp.token()}"},
    )

    assert response.status_code == 200


def test_without_a_path_prefix_the_path_is_the_original(
    client_for: Callable[[ConfigEdit], FlaskClient], idp: TestIdP
) -> None:
    def no_prefix(config: dict[str, Any]) -> dict[str, Any]:
        config["ext_authz"]["path_prefix"] = ""
        return config

    unprefixed = client_for(no_prefix)
    headers = {"Host": "code-search.internal", "Authorization": f"Bearer {idp.token()}"}

    assert unprefixed.get("/mcp/tools", headers=headers).status_code == 200
    assert unprefixed.get("/ext_authz/mcp/tools", headers=headers).status_code == 403


# --- 429 and 503 ----------------------------------------------------------------------------------


def test_over_the_clients_rate_limit_a_check_is_a_429_with_retry_after(
    client_for: Callable[[ConfigEdit], FlaskClient], idp: TestIdP
) -> None:
    def tiny_limit(config: dict[str, Any]) -> dict[str, Any]:
        config["clients"][0]["rate_limit"] = {"per_second": 0.01, "burst": 2}
        return config

    limited = client_for(tiny_limit)
    user_token = idp.token()
    answers = [check(limited, "vendor.example", "/", f"Bearer {user_token}") for _ in range(3)]

    assert [a.status_code for a in answers[:2]] == [200, 200]
    assert_denied(answers[2], 429, user_token)
    assert 1 <= int(answers[2].headers["Retry-After"]) <= 100


def test_a_check_without_a_bearer_token_spends_no_rate_limit(
    client_for: Callable[[ConfigEdit], FlaskClient], idp: TestIdP
) -> None:
    def tiny_limit(config: dict[str, Any]) -> dict[str, Any]:
        config["clients"][0]["rate_limit"] = {"per_second": 0.01, "burst": 1}
        return config

    limited = client_for(tiny_limit)
    for _ in range(3):
        assert check(limited, "vendor.example", "/").status_code == 401

    assert check(limited, "vendor.example", "/", f"Bearer {idp.token()}").status_code == 200


def test_a_dependency_down_is_a_503_with_retry_after(
    client: FlaskClient, services: Services, idp: TestIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_key() -> Any:
        raise TemporarilyUnavailableError(reason="no signing key", retry_after=7)

    monkeypatch.setattr(services, "signing_key", no_key)
    user_token = idp.token()

    response = check(client, "code-search.internal", "/mcp", f"Bearer {user_token}")

    assert_denied(response, 503, user_token, "no signing key")
    assert response.headers["Retry-After"] == "7"
    [row] = audit_rows(services)
    assert (row.decision, row.error) == ("denied", "temporarily_unavailable")


def test_an_unexpected_failure_is_a_503_that_tells_nothing(
    client: FlaskClient, services: Services, idp: TestIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> Any:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(services.policies, "get", broken)
    user_token = idp.token()

    response = check(client, "code-search.internal", "/mcp", f"Bearer {user_token}")

    assert_denied(response, 503, user_token, "secret internal detail", "RuntimeError")
    [row] = audit_rows(services)
    assert (row.decision, row.error) == ("denied", "server_error")


@pytest.mark.parametrize(
    "path",
    [
        "/mcp/../admin/x",
        "/mcp/%2e%2e/admin",
        "/mcp%2F..%2Fadmin",
        "/mcp/./tools",
        "/mcp//tools",
        "/mcp/..%5Cadmin",
    ],
)
def test_a_path_the_upstream_could_resolve_elsewhere_matches_no_route(
    client: FlaskClient, idp: TestIdP, path: str
) -> None:
    # The route is chosen by path prefix: "/mcp/../admin" must not get the /mcp route's
    # credential for a request the upstream resolves to /admin.
    response = check(client, "code-search.internal", path, f"Bearer {idp.token()}")

    assert_denied(response, 403)


def test_an_invalid_user_token_gets_the_invalid_token_challenge(client: FlaskClient) -> None:
    response = check(client, "code-search.internal", "/mcp", "Bearer not.a.jwt")

    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


def test_with_a_secret_only_a_check_carrying_it_gets_a_credential(
    client_for: Callable[[ConfigEdit], FlaskClient], idp: TestIdP
) -> None:
    secret = "envoy-proof-" + "e" * 20

    def with_secret(config: dict[str, Any]) -> dict[str, Any]:
        config["ext_authz"].update(listen="0.0.0.0:9191", secret=secret)
        return config

    client = client_for(with_secret)
    user = f"Bearer {idp.token()}"
    headers = {"Host": "code-search.internal", "Authorization": user}

    without = client.get("/ext_authz/mcp", headers=headers)
    wrong = client.get("/ext_authz/mcp", headers={**headers, "X-Sidecar-Ext-Authz": "guess"})
    right = client.get("/ext_authz/mcp", headers={**headers, "X-Sidecar-Ext-Authz": secret})

    assert_denied(without, 403)
    assert_denied(wrong, 403)
    assert right.status_code == 200
    assert right.headers["Authorization"].startswith("Bearer ey")
