"""Envoy's ``ext_authz`` HTTP service end to end: ``sidecar serve`` with its default server and
settings plus an ``ext_authz:`` listener, driven exactly as Envoy drives it
(tests/envoy_ext_authz.py, configured from deploy/envoy/envoy.yaml itself: its path_prefix,
header allow-lists, timeout, the secret header it adds and its status_on_error). What is
asserted is what Envoy would send upstream, or answer the client.

The user's token never reaches an upstream: it is replaced by our minted token, or by the
upstream's API key (and then removed). Every check is a decision of the audit trail, under
``ext_authz.client_id``, and the ext_authz listener and the gateway's answer nothing of each
other's."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select
from sqlalchemy.orm import Session

from sidecar.store.db import make_engine
from sidecar.store.models import AuditEventRow
from tests.conftest import (
    ACCESS_TOKEN_TYPE,
    CODE_SEARCH,
    GATEWAY_SECRET,
    TOKEN_EXCHANGE,
    ClientKeys,
    TestIdP,
    base_config,
)
from tests.envoy_ext_authz import Checked, EnvoyExtAuthz
from tests.functional.http.helpers import jwks_client, verify_as_upstream
from tests.launcher import Served, free_port, start_serve

VENDOR = "https://vendor.example/api"
ENVOY_CONFIG = Path(__file__).parents[2] / "deploy" / "envoy" / "envoy.yaml"
EXT_AUTHZ_SECRET = "ext-authz-secret-" + "e" * 24
BEARER_VENDOR = "https://api.bearer-vendor.example/v1"
RAW_VENDOR = "https://raw.example/api"
NO_POLICY = "https://no-policy.internal/mcp"
VENDOR_KEY = "vendor-key-" + "v" * 24
BEARER_KEY = "bearer-key-" + "b" * 24
RAW_KEY = "Token raw-key-" + "r" * 24
KEYS = (VENDOR_KEY, BEARER_KEY, RAW_KEY)
DENIED = {
    401: {"error": "invalid_token", "error_description": "A valid bearer token is required."},
    403: {"error": "access_denied", "error_description": "Not allowed by policy."},
    429: {"error": "rate_limited", "error_description": "Too many requests."},
}


def static_policy(audience: str, upstream: str) -> dict[str, Any]:
    return {
        "client_id": "gateway",
        "audience": audience,
        "scopes": ["api"],
        "default_scopes": ["api"],
        "ttl": 60,
        "credential": "static",
        "upstream": upstream,
    }


def ext_authz_config(home: Path, idp: TestIdP, listen: str) -> dict[str, Any]:
    """base_config's gateway client and policies, three upstreams with static keys, and the
    ext_authz listener on ``listen``."""
    config = base_config(idp, ClientKeys(), f"sqlite:///{home / 'sidecar.db'}")
    config["upstreams"] = [
        {
            "name": "vendor",
            "credentials": {"type": "header", "header": "X-API-Key", "token": "${VENDOR_KEY}"},
        },
        {"name": "bearer-vendor", "credentials": {"type": "bearer", "token": "${BEARER_KEY}"}},
        {
            "name": "raw",
            "credentials": {"type": "header", "header": "Authorization", "token": "${RAW_KEY}"},
        },
    ]
    config["policies"] += [
        static_policy(VENDOR, "vendor"),
        static_policy(BEARER_VENDOR, "bearer-vendor"),
        static_policy(RAW_VENDOR, "raw"),
    ]
    config["ext_authz"] = {
        "listen": listen,
        "secret": EXT_AUTHZ_SECRET,  # as the example Envoy configuration sends it
        "client_id": "gateway",
        "path_prefix": "/ext_authz",
        "routes": [
            {"host": "code-search.internal", "path_prefix": "/mcp", "audience": CODE_SEARCH},
            {
                "host": "code-search.internal",
                "path_prefix": "/admin",
                "audience": CODE_SEARCH,
                "scope": ["code.admin"],  # not allowed by the policy
            },
            {"host": "vendor.example", "audience": VENDOR},
            {"host": "*.bearer-vendor.example", "audience": BEARER_VENDOR},
            {"host": "raw.example", "audience": RAW_VENDOR},
            {"host": "no-policy.internal", "audience": NO_POLICY},
        ],
    }
    return config


def serve_with_ext_authz(
    home: Path, idp: TestIdP, *extra: str, edit: Any = None, workers: int = 2
) -> Served:
    """``sidecar serve`` with the ext_authz listener, once that listener answers too (it is a
    server of its own, which may start after the gateway's)."""
    listen = f"127.0.0.1:{free_port()}"
    config = ext_authz_config(home, idp, listen)
    if edit is not None:
        edit(config)
    env = {"VENDOR_KEY": VENDOR_KEY, "BEARER_KEY": BEARER_KEY, "RAW_KEY": RAW_KEY}
    served = start_serve(home, config, *extra, env=env, workers=workers)
    served.extra["ext_authz"] = f"http://{listen}"
    deadline = time.monotonic() + 30
    while True:
        try:
            requests.get(f"{served.extra['ext_authz']}/ext_authz/", timeout=2)
            return served
        except requests.RequestException:
            if time.monotonic() > deadline:
                served.kill()
                raise
            time.sleep(0.05)


def envoy_for(url: str) -> EnvoyExtAuthz:
    """Envoy's ext_authz filter as deploy/envoy/envoy.yaml configures it (read from the file,
    with this test's ext_authz.secret in place of its placeholder)."""
    return EnvoyExtAuthz.from_envoy_config(ENVOY_CONFIG, url, secret=EXT_AUTHZ_SECRET)


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> TestIdP:
    return TestIdP(tmp_path_factory.mktemp("idp"))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, idp: TestIdP) -> Iterator[Served]:
    server = serve_with_ext_authz(tmp_path_factory.mktemp("sidecar"), idp)
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def envoy(served: Served) -> EnvoyExtAuthz:
    return envoy_for(served.extra["ext_authz"])


def request(
    envoy: EnvoyExtAuthz,
    host: str,
    path: str,
    authorization: str | None = None,
    method: str = "GET",
    **headers: str,
) -> Checked:
    """A downstream request through Envoy's filter."""
    sent = {"Host": host, **headers}
    if authorization is not None:
        sent["Authorization"] = authorization
    return envoy.check(method, path, sent)


def assert_denied(checked: Checked, status: int, *never_echoed: str) -> None:
    """What the client gets for a refusal: ``status``, the fixed body, no credential."""
    assert not checked.allowed
    assert not checked.error, "Envoy took its error path (a 5xx or no answer)"
    assert checked.status == status
    assert json.loads(checked.body) == DENIED[status]
    assert "authorization" not in checked.client_headers
    assert "x-api-key" not in checked.client_headers
    text = checked.body.decode() + json.dumps(checked.client_headers)
    for value in (*KEYS, *never_echoed):
        assert value not in text


def assert_nowhere(value: str, headers: dict[str, str]) -> None:
    for name, header in headers.items():
        assert value not in header, f"found in the {name} header"


def bearer_of(checked: Checked) -> str:
    scheme, _, token = checked.upstream_headers["authorization"].partition(" ")
    assert scheme == "Bearer"
    return token


# --- allowed ------------------------------------------------------------------------------------


def test_a_minted_token_replaces_the_users_token_upstream(
    served: Served, envoy: EnvoyExtAuthz, idp: TestIdP
) -> None:
    user_token = idp.token(sub="alice@example.com", email="alice@example.com")

    checked = envoy.check(
        "GET",
        "/mcp",
        {"Host": "code-search.internal", "Authorization": f"Bearer {user_token}"},
        body=b'{"jsonrpc": "2.0"}',
    )

    assert checked.allowed, checked
    claims = verify_as_upstream(jwks_client(served.url), bearer_of(checked), CODE_SEARCH)
    assert (claims["sub"], claims["aud"], claims["client_id"]) == (
        "alice@example.com",
        CODE_SEARCH,
        "gateway",
    )
    assert_nowhere(user_token, checked.upstream_headers)
    # Envoy sends no body to the service (with_request_body unset): Content-Length is its own 0.
    assert checked.check_headers["content-length"] == "0"
    assert (checked.check_status, checked.check_path) == (200, "/ext_authz/mcp")


def test_a_key_in_a_header_of_its_own_is_sent_and_the_users_token_removed(
    envoy: EnvoyExtAuthz, idp: TestIdP
) -> None:
    user_token = idp.token()

    checked = request(envoy, "vendor.example", "/api/items", f"Bearer {user_token}")

    assert checked.allowed, checked
    assert checked.upstream_headers["x-api-key"] == VENDOR_KEY
    assert "authorization" not in checked.upstream_headers
    assert_nowhere(user_token, checked.upstream_headers)


def test_a_bearer_key_is_sent_for_a_wildcard_host_with_a_port(
    envoy: EnvoyExtAuthz, idp: TestIdP
) -> None:
    user_token = idp.token()

    checked = request(envoy, "api.bearer-vendor.example:10000", "/v1", f"Bearer {user_token}")

    assert checked.allowed, checked
    assert checked.upstream_headers["authorization"] == f"Bearer {BEARER_KEY}"
    assert "x-api-key" not in checked.upstream_headers
    assert_nowhere(user_token, checked.upstream_headers)


def test_a_key_whose_header_is_authorization_reaches_the_upstream(
    envoy: EnvoyExtAuthz, idp: TestIdP
) -> None:
    user_token = idp.token()

    checked = request(envoy, "raw.example", "/api", f"Bearer {user_token}")

    assert checked.allowed, checked
    assert checked.upstream_headers["authorization"] == RAW_KEY
    assert_nowhere(user_token, checked.upstream_headers)


def test_the_method_and_query_envoy_keeps_do_not_change_the_decision(
    served: Served, envoy: EnvoyExtAuthz, idp: TestIdP
) -> None:
    checked = request(
        envoy, "code-search.internal", "/mcp/tools?x=1", f"Bearer {idp.token()}", method="POST"
    )

    assert checked.allowed, checked
    assert checked.check_path == "/ext_authz/mcp/tools?x=1"
    verify_as_upstream(jwks_client(served.url), bearer_of(checked), CODE_SEARCH)


def test_a_users_own_api_key_header_is_overwritten(envoy: EnvoyExtAuthz, idp: TestIdP) -> None:
    checked = request(
        envoy, "vendor.example", "/api", f"Bearer {idp.token()}", **{"X-API-Key": "forged"}
    )

    assert checked.allowed, checked
    assert checked.upstream_headers["x-api-key"] == VENDOR_KEY


# --- 401: no usable user token ------------------------------------------------------------------


def test_no_authorization_is_a_401_with_a_bearer_challenge_for_the_client(
    envoy: EnvoyExtAuthz,
) -> None:
    checked = request(envoy, "code-search.internal", "/mcp")

    assert_denied(checked, 401)
    assert checked.client_headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    ("authorization", "credentials"),
    [
        ("Basic Z2F0ZXdheTpzZWNyZXQ=", "Z2F0ZXdheTpzZWNyZXQ="),
        ("Bearer a b", None),
        ("Bearer", None),
    ],
)
def test_a_malformed_authorization_is_a_401(
    envoy: EnvoyExtAuthz, authorization: str, credentials: str | None
) -> None:
    checked = request(envoy, "code-search.internal", "/mcp", authorization)

    assert_denied(checked, 401, *([credentials] if credentials else []))
    assert checked.client_headers["www-authenticate"].startswith("Bearer")


def test_an_expired_user_token_is_a_401(envoy: EnvoyExtAuthz, idp: TestIdP) -> None:
    now = int(time.time())
    user_token = idp.token(iat=now - 900, exp=now - 300)

    checked = request(envoy, "code-search.internal", "/mcp", f"Bearer {user_token}")

    assert_denied(checked, 401, user_token)


# --- 403: refused ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "path"),
    [
        pytest.param("code-search.internal", "/admin/users", id="scope-not-allowed"),
        pytest.param("unknown.example", "/mcp", id="no-route-for-the-host"),
        pytest.param("code-search.internal", "/mcpx", id="no-route-for-the-path"),
        pytest.param("no-policy.internal", "/mcp", id="no-policy-for-the-audience"),
    ],
)
def test_a_check_the_policies_refuse_is_a_403(
    envoy: EnvoyExtAuthz, idp: TestIdP, host: str, path: str
) -> None:
    user_token = idp.token()

    checked = request(envoy, host, path, f"Bearer {user_token}")

    assert_denied(checked, 403, user_token, host, path.lstrip("/"), "code.admin")


# --- the rate limit -----------------------------------------------------------------------------


def test_the_rate_limit_of_the_client_applies(
    tmp_path_factory: pytest.TempPathFactory, idp: TestIdP
) -> None:
    def tiny_limit(config: dict[str, Any]) -> None:
        config["clients"][0]["rate_limit"] = {"per_second": 0.01, "burst": 2}

    # One worker on the gateway's listener; the ext_authz listener has one of its own, whose
    # bucket counts every check.
    served = serve_with_ext_authz(
        tmp_path_factory.mktemp("limited"), idp, edit=tiny_limit, workers=1
    )
    try:
        envoy = envoy_for(served.extra["ext_authz"])
        user_token = idp.token()
        answers = [
            request(envoy, "vendor.example", "/api", f"Bearer {user_token}") for _ in range(3)
        ]
    finally:
        served.kill()

    assert [a.allowed for a in answers] == [True, True, False]
    assert_denied(answers[2], 429, user_token)


# --- the audit trail ----------------------------------------------------------------------------


def audit_rows_after(served: Served, after_id: int, count: int) -> list[AuditEventRow]:
    """The exchange decisions written after ``after_id``, once ``count`` of them are (the
    audit writer writes a batch every 50 ms)."""
    engine = make_engine(served.database_url)
    try:
        deadline = time.monotonic() + 5
        while True:
            with Session(engine) as session:
                rows = list(
                    session.scalars(
                        select(AuditEventRow)
                        .where(AuditEventRow.id > after_id)
                        .where(AuditEventRow.decision.in_(("granted", "denied")))
                        .order_by(AuditEventRow.id)
                    )
                )
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)
    finally:
        engine.dispose()


def last_audit_id(served: Served) -> int:
    time.sleep(0.2)  # earlier tests' events, still in the writer's batch
    engine = make_engine(served.database_url)
    try:
        with Session(engine) as session:
            return max(session.scalars(select(AuditEventRow.id)), default=0)
    finally:
        engine.dispose()


def test_every_check_is_a_decision_of_the_audit_trail(
    served: Served, envoy: EnvoyExtAuthz, idp: TestIdP
) -> None:
    after = last_audit_id(served)
    user_token = idp.token(sub="audited@example.com")
    checks = [
        ("code-search.internal", "/mcp", f"Bearer {user_token}"),
        ("vendor.example", "/api", f"Bearer {user_token}"),
        ("code-search.internal", "/admin/x", f"Bearer {user_token}"),
        ("code-search.internal", "/mcp", None),
        ("unknown.example", "/", f"Bearer {user_token}"),
    ]
    for host, path, authorization in checks:
        request(envoy, host, path, authorization)

    rows = audit_rows_after(served, after, len(checks))

    assert [(r.decision, r.error) for r in rows] == [
        ("granted", None),
        ("granted", None),
        ("denied", "invalid_scope"),
        ("denied", "invalid_request"),
        ("denied", "invalid_target"),
    ]
    assert {r.client_id for r in rows} == {"gateway"}
    assert [json.loads(r.audiences or "[]") for r in rows] == [
        [CODE_SEARCH],
        [VENDOR],
        [CODE_SEARCH],
        [CODE_SEARCH],
        [],  # no route: no audience
    ]
    assert [r.subject for r in rows[:3]] == ["audited@example.com"] * 3
    assert rows[1].reason == "static credential of upstream vendor"
    dump = " ".join(str(vars(row)) for row in rows)
    for secret in (user_token, *KEYS):
        assert secret not in dump


# --- each listener answers only its own ----------------------------------------------------------


def test_the_gateway_listener_answers_no_check(served: Served, idp: TestIdP) -> None:
    checked = request(
        envoy_for(served.url), "code-search.internal", "/mcp", f"Bearer {idp.token()}"
    )

    assert not checked.allowed
    assert checked.check_status == 404
    assert "authorization" not in checked.client_headers


def test_the_ext_authz_listener_serves_no_token_endpoint(served: Served, idp: TestIdP) -> None:
    subject_token = idp.token()
    form = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject_token,
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "audience": VENDOR,
    }
    url = served.extra["ext_authz"]

    envoy = {"x-sidecar-ext-authz": EXT_AUTHZ_SECRET}  # as Envoy sends its checks
    direct = requests.post(
        f"{url}/token", data=form, auth=("gateway", GATEWAY_SECRET), headers=envoy, timeout=5
    )
    # Under the prefix, for a host with a route: a check like any other, with no bearer token.
    routed = requests.post(
        f"{url}/ext_authz/token",
        data=form,
        auth=("gateway", GATEWAY_SECRET),
        headers={"Host": "vendor.example", **envoy},
        timeout=5,
    )
    # Without the secret, the caller is not Envoy: refused before anything else.
    stranger = requests.post(
        f"{url}/ext_authz/token",
        data=form,
        auth=("gateway", GATEWAY_SECRET),
        headers={"Host": "vendor.example"},
        timeout=5,
    )

    assert (direct.status_code, direct.json()) == (403, DENIED[403])
    assert (routed.status_code, routed.json()) == (401, DENIED[401])
    assert (stranger.status_code, stranger.json()) == (403, DENIED[403])
    for answer in (direct, routed, stranger):
        assert "access_token" not in answer.text
        for secret in (subject_token, VENDOR_KEY):
            assert secret not in answer.text
            assert_nowhere(secret, dict(answer.headers))


@pytest.mark.parametrize("path", ["/admin/policies", "/ext_authz/admin/policies", "/metrics"])
def test_the_ext_authz_listener_serves_nothing_else(served: Served, path: str) -> None:
    answer = requests.get(f"{served.extra['ext_authz']}{path}", timeout=5)

    assert answer.status_code in (401, 403)
    assert answer.json() in (DENIED[401], DENIED[403])


# --- under gunicorn -------------------------------------------------------------------------------


@pytest.fixture(params=["granian", "gunicorn"])
def any_server(
    request: pytest.FixtureRequest,
    served: Served,
    tmp_path_factory: pytest.TempPathFactory,
    idp: TestIdP,
) -> Iterator[Served]:
    """The module's server (granian, the default), or ``sidecar serve --server gunicorn``."""
    if request.param == "granian":
        yield served
        return
    server = serve_with_ext_authz(
        tmp_path_factory.mktemp("gunicorn"), idp, "--server", "gunicorn", workers=1
    )
    try:
        yield server
    finally:
        server.kill()


def test_the_same_check_flows_under_each_server(any_server: Served, idp: TestIdP) -> None:
    envoy = envoy_for(any_server.extra["ext_authz"])
    user_token = idp.token(sub="carol@example.com")

    allowed = request(envoy, "code-search.internal", "/mcp", f"Bearer {user_token}")
    denied = request(envoy, "code-search.internal", "/mcp")
    on_gateway = request(
        envoy_for(any_server.url), "code-search.internal", "/mcp", f"Bearer {user_token}"
    )

    assert allowed.allowed, allowed
    claims = verify_as_upstream(jwks_client(any_server.url), bearer_of(allowed), CODE_SEARCH)
    assert claims["sub"] == "carol@example.com"
    assert_nowhere(user_token, allowed.upstream_headers)
    assert_denied(denied, 401)
    assert (on_gateway.allowed, on_gateway.check_status) == (False, 404)
