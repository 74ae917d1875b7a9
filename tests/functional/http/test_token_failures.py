"""POST /token when something other than the request is wrong, over real HTTP: a dependency
down (503 ``temporarily_unavailable`` with ``Retry-After``), an unexpected exception (500
``server_error`` with no detail), and a method other than POST (405 with ``Allow``)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from sidecar.config import settings_from_mapping
from sidecar.keys.keyring import TokenSigner
from sidecar.services import Services
from sidecar.store.db import make_engine
from sidecar.web.app import create_app
from tests.conftest import (
    CLIENT_ASSERTION_TYPE,
    ClientKeys,
    LiveServer,
    TestIdP,
    audit_rows,
    make_services,
)
from tests.functional.http.helpers import assert_oauth_error, exchange_form, post_token


def closed_loopback_port() -> int:
    """A loopback TCP port with nothing listening: connections are refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def assert_retry_later(response: requests.Response, *never_echoed: str) -> None:
    assert_oauth_error(response, 503, "temporarily_unavailable", *never_echoed)
    assert int(response.headers["Retry-After"]) > 0
    assert "access_token" not in response.text


@pytest.fixture
def live(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Start servers for services a test builds itself; all are stopped at the end."""
    started: list[tuple[LiveServer, Services]] = []

    def start(services: Services) -> LiveServer:
        server = LiveServer(create_app(services.settings, services))
        started.append((server, services))
        return server

    yield start
    for server, services in started:
        server.stop()
        services.engine.dispose()


# --- temporarily_unavailable: the issuer's keys ------------------------------------------------


def test_issuer_keys_unreachable_with_nothing_cached_is_503(
    config: dict[str, Any], idp: TestIdP, live: Any
) -> None:
    issuer = config["trusted_issuers"][0]
    del issuer["jwks_file"]
    issuer["jwks_uri"] = f"http://127.0.0.1:{closed_loopback_port()}/.well-known/jwks.json"
    services = make_services(settings_from_mapping(config, env={}))
    server = live(services)

    subject = idp.token()
    response = server.exchange(subject)

    assert_retry_later(response, subject)
    [row] = audit_rows(services)
    assert (row.decision, row.error) == ("denied", "temporarily_unavailable")


def test_issuer_keys_served_over_http_are_used(
    config: dict[str, Any], idp: TestIdP, live: Any
) -> None:
    # The counterpart of the test above: the same configuration with the JWKS actually served.
    def serve_jwks(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(idp.public_jwks()).encode()]

    jwks_app = LiveServer(serve_jwks)
    try:
        issuer = config["trusted_issuers"][0]
        del issuer["jwks_file"]
        issuer["jwks_uri"] = f"{jwks_app.url}/.well-known/jwks.json"
        server = live(make_services(settings_from_mapping(config, env={})))
        response = server.exchange(idp.token())
        assert response.status_code == 200, response.text
    finally:
        jwks_app.stop()


# --- temporarily_unavailable: the database -----------------------------------------------------


@pytest.fixture
def database_down_from_the_start(config: dict[str, Any], live: Any) -> tuple[LiveServer, Services]:
    # A real fault, not a mock: the services talk to a PostgreSQL URL on a loopback port where
    # nothing listens, as a replica would whose database is down when it starts. The engine is
    # built by the product's own make_engine (its connect timeout and pool settings apply), and
    # nothing was ever loaded, so no cache can hide the outage: policies, keys and the jti store
    # must all answer 503.
    settings = settings_from_mapping(config, env={})
    url = f"postgresql+psycopg://postgres@127.0.0.1:{closed_loopback_port()}/sidecar"
    services = Services(settings, engine=make_engine(url))
    return live(services), services


def test_database_down_with_nothing_cached_is_503(
    database_down_from_the_start: tuple[LiveServer, Services], idp: TestIdP
) -> None:
    server, _ = database_down_from_the_start
    subject = idp.token()
    response = server.exchange(subject)
    assert_retry_later(response, subject)


def test_database_down_makes_a_client_assertion_503_not_401(
    database_down_from_the_start: tuple[LiveServer, Services],
    idp: TestIdP,
    client_keys: ClientKeys,
) -> None:
    # The replay check of private_key_jwt needs the database; an outage is not a bad credential.
    server, _ = database_down_from_the_start
    subject, assertion = idp.token(), client_keys.assertion()
    form = exchange_form(
        subject, client_assertion_type=CLIENT_ASSERTION_TYPE, client_assertion=assertion
    )
    response = post_token(server, form, auth=None)
    assert_retry_later(response, subject, assertion)


def test_readyz_is_503_when_the_database_was_never_reachable(
    database_down_from_the_start: tuple[LiveServer, Services],
) -> None:
    server, _ = database_down_from_the_start
    response = requests.get(f"{server.url}/readyz", timeout=10)
    assert response.status_code == 503
    assert response.json()["checks"] == {"database": False, "signing_key": False, "serving": True}
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200


def take_sqlite_database_away(services: Services) -> None:
    # A real fault for the embedded database: its file (and WAL side files) disappear and the
    # path becomes a directory, so SQLite cannot open it. Pooled connections would keep the old
    # file open and hide the fault, so the pool is emptied, as after any connection loss.
    database = Path(str(services.engine.url.database))
    for suffix in ("", "-wal", "-shm"):
        part = database.with_name(database.name + suffix)
        if part.exists():
            part.rename(part.with_name(part.name + ".gone"))
    database.mkdir()
    services.engine.dispose()


def bring_sqlite_database_back(services: Services) -> None:
    database = Path(str(services.engine.url.database))
    database.rmdir()
    for suffix in ("", "-wal", "-shm"):
        part = database.with_name(database.name + suffix + ".gone")
        if part.exists():
            part.rename(database.with_name(database.name + suffix))
    services.engine.dispose()


def exchange_until_refused(server: LiveServer, idp: TestIdP) -> tuple[int, requests.Response, str]:
    """Exchange fresh tokens until one is refused (within 10 s): (grants before it, it, its
    subject token)."""
    deadline = time.monotonic() + 10
    granted = 0
    while time.monotonic() < deadline:
        subject = idp.token()
        response = server.exchange(subject)
        if response.status_code != 200:
            return granted, response, subject
        granted += 1
        time.sleep(0.02)
    raise AssertionError("grants kept being answered with the audit trail's database gone")


def test_database_lost_while_serving_refuses_tokens_it_cannot_audit(
    server: LiveServer,
    services: Services,
    idp: TestIdP,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    # Policies and keys are cached in process, so the exchange itself could go through; but
    # once audit records cannot be written, grants are refused rather than answered unrecorded.
    assert server.exchange(idp.token()).status_code == 200

    take_sqlite_database_away(services)
    captured_logs.clear()
    _, response, subject = exchange_until_refused(server, idp)

    assert_retry_later(response, subject)
    assert "audit records not written" in captured_logs.text
    assert not services.audit.healthy


def test_grants_queued_when_the_database_went_away_are_written_when_it_returns(
    server: LiveServer, services: Services, idp: TestIdP
) -> None:
    assert server.exchange(idp.token()).status_code == 200
    before = len(audit_rows(services))

    take_sqlite_database_away(services)
    granted, refused, _ = exchange_until_refused(server, idp)
    bring_sqlite_database_back(services)

    deadline = time.monotonic() + 10
    while not services.audit.healthy and time.monotonic() < deadline:
        time.sleep(0.05)
    assert services.audit.healthy
    rows = audit_rows(services)[before:]
    # Every grant answered while the database was away, and the denial, reached the table.
    assert [row.decision for row in rows][: granted + 1] == ["granted"] * granted + ["denied"]
    assert rows[granted].error == "temporarily_unavailable"
    assert refused.status_code == 503
    assert server.exchange(idp.token()).status_code == 200


def test_readyz_is_503_when_the_database_is_lost(server: LiveServer, services: Services) -> None:
    assert requests.get(f"{server.url}/readyz", timeout=10).status_code == 200
    take_sqlite_database_away(services)
    response = requests.get(f"{server.url}/readyz", timeout=10)
    assert response.status_code == 503
    assert response.json()["checks"]["database"] is False


# --- server_error -------------------------------------------------------------------------------


def test_an_unexpected_exception_is_a_bare_server_error(
    server: LiveServer,
    services: Services,
    idp: TestIdP,
    monkeypatch: pytest.MonkeyPatch,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    detail = "secret " + "detail"  # built here, so no source line quoted in a log holds it

    def sign(self: TokenSigner, claims: dict[str, Any], key: Any) -> str:
        raise RuntimeError(detail)

    monkeypatch.setattr(TokenSigner, "sign", sign)
    subject = idp.token()
    response = server.exchange(subject)

    assert_oauth_error(response, 500, "server_error", subject, detail, "Traceback")
    assert response.content == b'{"error":"server_error","error_description":"Internal error."}'
    assert "RuntimeError" not in response.text
    assert "unexpected RuntimeError" in captured_logs.text
    assert detail not in captured_logs.text
    [row] = audit_rows(services)
    assert (row.decision, row.error, row.reason) == ("denied", "server_error", "RuntimeError")
    assert row.jti is None


def test_an_unexpected_exception_outside_the_token_endpoint_is_a_bare_server_error(
    server: LiveServer, services: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    def load() -> Any:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(services.keyring, "get", load)
    response = requests.get(f"{server.url}/.well-known/jwks.json", timeout=10)
    assert response.status_code == 500
    assert response.json() == {"error": "server_error", "error_description": "Internal error."}
    assert "secret detail" not in response.text


# --- methods ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_a_method_other_than_post_is_405_with_allow(
    server: LiveServer, idp: TestIdP, method: str
) -> None:
    subject = idp.token()
    response = requests.request(
        method, server.token_url, params={"subject_token": subject}, timeout=10
    )
    assert_oauth_error(response, 405, "invalid_request", subject)
    allowed = {value.strip() for value in response.headers["Allow"].split(",")}
    assert "POST" in allowed
    assert "GET" not in allowed
