"""Shared fixtures: a test identity provider with keys generated here, configurations, a real
SQLite file or PostgreSQL database, and the real app served over HTTP on loopback."""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import sessionmaker
from werkzeug.serving import BaseWSGIServer, make_server

from sidecar.config import Settings, settings_from_mapping
from sidecar.services import Services
from sidecar.store.models import AuditEventRow
from sidecar.web.app import create_app

SIDECAR_ISSUER = "https://sidecar.test.example"
GATEWAY_SECRET = "gateway-secret-" + "x" * 24
OTHER_SECRET = "other-secret-" + "y" * 24
CODE_SEARCH = "https://code-search.internal/mcp"
TICKETS = "https://tickets.internal/mcp"
DISABLED = "https://disabled.internal/mcp"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class FakeClock:
    """A controllable clock for the service (PyJWT still uses the real time for exp/nbf)."""

    def __init__(self, now: float | None = None) -> None:
        self.now = now if now is not None else time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class TestIdP:
    __test__ = False  # a fixture helper, not a test class

    """A test identity provider whose keys are generated per test and published as a JWKS file."""

    issuer = "https://idp.test.example"
    audience = "https://gateway.test.example"

    def __init__(self, directory: Path, rsa_key: rsa.RSAPrivateKey | None = None) -> None:
        self.rsa_key = rsa_key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec_key = ec.generate_private_key(ec.SECP256R1())
        self.keys = {"rsa-1": (self.rsa_key, "RS256"), "ec-1": (self.ec_key, "ES256")}
        self.jwks_path = directory / "idp.jwks.json"
        self.write_jwks()

    def public_jwks(self) -> dict[str, Any]:
        keys = []
        for kid, (key, alg) in self.keys.items():
            algorithm = RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm
            jwk = algorithm.to_jwk(key.public_key(), as_dict=True)
            jwk.update(kid=kid, alg=alg, use="sig")
            keys.append(jwk)
        return {"keys": keys}

    def write_jwks(self) -> None:
        self.jwks_path.write_text(json.dumps(self.public_jwks()))

    def token(
        self,
        *,
        kid: str = "rsa-1",
        alg: str | None = None,
        headers: dict[str, Any] | None = None,
        omit: tuple[str, ...] = (),
        key: Any = None,
        **claims: Any,
    ) -> str:
        """A subject token; claims override the defaults, ``omit`` removes some."""
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "sub": "alice@example.com",
            "aud": self.audience,
            "iat": now,
            "exp": now + 600,
            "scope": "code.read code.search",
            "jti": secrets.token_urlsafe(8),
        }
        payload.update(claims)
        for name in omit:
            payload.pop(name, None)
        signing_key, default_alg = self.keys.get(kid, (self.rsa_key, "RS256"))
        return jwt.encode(
            payload,
            key if key is not None else signing_key,
            algorithm=alg or default_alg,
            headers={"kid": kid, **(headers or {})},
        )


class ClientKeys:
    """The private_key_jwt client's key pair and assertions signed with it."""

    client_id = "jwt-gateway"

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        jwk = ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        jwk.update(kid="client-1", alg="ES256", use="sig")
        self.jwks = {"keys": [jwk]}

    def assertion(self, *, audience: str = SIDECAR_ISSUER, **claims: Any) -> str:
        now = int(time.time())
        payload = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": audience,
            "iat": now,
            "exp": now + 60,
            "jti": secrets.token_urlsafe(12),
        }
        payload.update(claims)
        return jwt.encode(payload, self.key, algorithm="ES256", headers={"kid": "client-1"})


def base_config(idp: TestIdP, client_keys: ClientKeys, database_url: str) -> dict[str, Any]:
    return {
        "issuer": SIDECAR_ISSUER,
        "database_url": database_url,
        "tokens": {"algorithm": "ES256", "max_ttl": 300, "leeway": 30},
        "keys": {"rotate_every": "24h", "publish_ahead": "15m", "retain_after": "15m"},
        "trusted_issuers": [
            {
                "issuer": idp.issuer,
                "jwks_file": str(idp.jwks_path),
                "audiences": [idp.audience],
                "algorithms": ["RS256", "ES256"],
            }
        ],
        "clients": [
            {"client_id": "gateway", "client_secret": GATEWAY_SECRET},
            {"client_id": client_keys.client_id, "jwks": client_keys.jwks},
            {"client_id": "no-exchange", "client_secret": OTHER_SECRET, "grant_types": []},
        ],
        "policies": [
            {
                "client_id": "gateway",
                "audience": CODE_SEARCH,
                "scopes": ["code.read", "code.search"],
                "default_scopes": ["code.read"],
                "ttl": 120,
                "copy_claims": ["email"],
            },
            {
                "client_id": "gateway",
                "audience": TICKETS,
                "scopes": ["tickets.read"],
                "default_scopes": ["tickets.read"],
                "ttl": 60,
                "require_subject_scopes": True,
            },
            {
                "client_id": "gateway",
                "audience": DISABLED,
                "scopes": ["code.read"],
                "ttl": 60,
                "enabled": False,
            },
            {
                "client_id": client_keys.client_id,
                "audience": CODE_SEARCH,
                "scopes": ["code.read"],
                "default_scopes": ["code.read"],
                "ttl": 120,
            },
            {
                "client_id": "no-exchange",
                "audience": CODE_SEARCH,
                "scopes": ["code.read"],
                "default_scopes": ["code.read"],
                "ttl": 120,
            },
        ],
    }


# --- databases --------------------------------------------------------------------------------

POSTGRES_URL = os.environ.get("SIDECAR_TEST_POSTGRES_URL")
DATA_TABLES = (
    "policies",
    "policy_versions",
    "signing_keys",
    "client_assertion_jtis",
    "audit_events",
)


@contextmanager
def fresh_postgres_database(prefix: str) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped afterwards; skips the test with the
    standard reason when SIDECAR_TEST_POSTGRES_URL is not set."""
    if not POSTGRES_URL:
        pytest.skip("SIDECAR_TEST_POSTGRES_URL is not set: PostgreSQL tests skipped")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield POSTGRES_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, migrated, dropped at the end."""
    from sidecar.store import migrate
    from sidecar.store.db import make_engine

    with fresh_postgres_database("sidecar_test") as url:
        engine = make_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'sidecar.db'}"


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue("postgres_database")
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {', '.join(DATA_TABLES)}"))
    engine.dispose()
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs against a real SQLite file and a real PostgreSQL server."""
    return str(request.getfixturevalue(f"{request.param}_url"))


# --- the service --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def idp_rsa_key() -> rsa.RSAPrivateKey:
    """Generated once per session: a 2048-bit RSA key costs ~0.1 s, paid by every test otherwise."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def idp(tmp_path: Path, idp_rsa_key: rsa.RSAPrivateKey) -> TestIdP:
    return TestIdP(tmp_path, idp_rsa_key)


@pytest.fixture
def client_keys() -> ClientKeys:
    return ClientKeys()


@pytest.fixture
def config(idp: TestIdP, client_keys: ClientKeys, sqlite_url: str) -> dict[str, Any]:
    """The configuration as a YAML-shaped mapping; tests may edit it before ``settings``."""
    return base_config(idp, client_keys, sqlite_url)


@pytest.fixture
def settings(config: dict[str, Any]) -> Settings:
    return settings_from_mapping(config, env={})


def make_services(settings: Settings, **kwargs: Any) -> Services:
    services = Services(settings, **kwargs)
    services.prepare()
    return services


@pytest.fixture
def services(settings: Settings) -> Iterator[Services]:
    services = make_services(settings)
    yield services
    services.close()


def audit_rows(services: Services, *, after_id: int = 0) -> list[AuditEventRow]:
    """The audit rows, oldest first, once every event queued so far is written."""
    assert services.audit.flush(), "audit events still queued"
    with sessionmaker(services.engine)() as session:
        query = select(AuditEventRow).where(AuditEventRow.id > after_id)
        return list(session.scalars(query.order_by(AuditEventRow.id)))


class LiveServer:
    """The real WSGI app served over HTTP on 127.0.0.1 in a background thread."""

    def __init__(self, app: Any) -> None:
        self._server: BaseWSGIServer = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self.token_url = f"{self.url}/token"
        # A short poll interval: stop() returns at once instead of after up to half a second.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(5)

    def exchange(
        self,
        subject_token: str | None,
        *,
        auth: tuple[str, str] | None = ("gateway", GATEWAY_SECRET),
        **params: Any,
    ) -> requests.Response:
        """POST /token with a token-exchange form; params override or add (None drops one)."""
        form: dict[str, Any] = {
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": subject_token,
            "subject_token_type": ACCESS_TOKEN_TYPE,
            "audience": CODE_SEARCH,
        }
        form.update(params)
        form = {k: v for k, v in form.items() if v is not None}
        return requests.post(self.token_url, data=form, auth=auth, timeout=10)


@pytest.fixture
def server(services: Services) -> Iterator[LiveServer]:
    live = LiveServer(create_app(services.settings, services))
    yield live
    live.stop()


@pytest.fixture
def captured_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every log record of the service at DEBUG and above."""
    caplog.set_level(logging.DEBUG)
    return caplog


# --- no process outlives the run --------------------------------------------------------------


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a server a test started is still alive (and kill it)."""
    from tests.launcher import still_running
    from tests.loopback import kill_tree

    alive = still_running()
    if not alive:
        return
    for process in alive:
        kill_tree(process)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            "ERROR: processes started by tests were still running at the end of the session "
            f"(killed): {[' '.join(map(str, p.args))[:120] for p in alive]}",
            red=True,
        )
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
