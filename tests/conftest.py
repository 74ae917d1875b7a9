"""Shared fixtures: a test identity provider with keys generated here, configurations, a real
SQLite file or PostgreSQL database, and the real app served over HTTP on loopback."""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import jwt
import pytest
import requests
import yaml
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from flask import Flask
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.orm import sessionmaker
from werkzeug.serving import BaseWSGIServer, make_server

from sidecar.config import Settings, load_settings, settings_from_mapping
from sidecar.services import Services
from sidecar.store import migrate
from sidecar.store.audit_query import EXCHANGES
from sidecar.store.db import make_engine
from sidecar.store.models import AuditEventRow
from sidecar.store.policies import PolicyStore
from sidecar.web.app import create_app
from tests.functional.http.admin_support import admin_credentials
from tests.launcher import Served, start_serve

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

    def assertion(
        self, *, audience: str = SIDECAR_ISSUER, signing_key: Any = None, **claims: Any
    ) -> str:
        """An RFC 7523 client assertion under the client's kid, signed with its key (or
        ``signing_key``); claims override the defaults."""
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
        key = signing_key if signing_key is not None else self.key
        return jwt.encode(payload, key, algorithm="ES256", headers={"kid": "client-1"})

    def impostor_assertion(self, **claims: Any) -> str:
        """Claims to be the client, under its kid, but signed with a key that is not its own."""
        return self.assertion(signing_key=ec.generate_private_key(ec.SECP256R1()), **claims)

    def unsigned_assertion(self, **claims: Any) -> str:
        """The client's assertion under its kid, but with ``"alg": "none"`` and no signature."""
        payload = self.assertion(**claims).split(".")[1]
        header = base64.urlsafe_b64encode(b'{"alg":"none","kid":"client-1"}').rstrip(b"=")
        return f"{header.decode()}.{payload}."


def exchange_params(subject_token: str | None, /, **params: Any) -> dict[str, Any]:
    """The gateway's token-exchange form for CODE_SEARCH; params override or add (None drops
    one)."""
    form: dict[str, Any] = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject_token,
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "audience": CODE_SEARCH,
    }
    form.update(params)
    return {name: value for name, value in form.items() if value is not None}


# ``keys:`` for the tests of key rotation: a new key every hour, published ten minutes before it
# signs, the old one kept ten minutes after; each instance reloads the keyring every second.
HOURLY_KEYS = {
    "rotate_every": "1h",
    "publish_ahead": "10m",
    "retain_after": "10m",
    "refresh_interval": "1s",
}


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
REDIS_URL = os.environ.get("SIDECAR_TEST_REDIS_URL")


@pytest.fixture
def redis_url() -> str:
    """The machine's Redis (SIDECAR_TEST_REDIS_URL); tests that need it skip without it."""
    if not REDIS_URL:
        pytest.skip("SIDECAR_TEST_REDIS_URL is not set: Redis tests skipped")
    return REDIS_URL


# Authorization headers that say Basic but carry no usable client credentials.
MALFORMED_BASIC_HEADERS = [
    pytest.param("Basic !!!not-base64!!!", id="not-base64"),
    pytest.param("Basic " + base64.b64encode(b"gateway").decode(), id="no-secret"),  # no colon
    pytest.param("Basic " + base64.b64encode(b"gateway:\xff\xfe").decode(), id="not-utf8"),
    pytest.param("Basic", id="no-credentials"),
]

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


ConfigEdit = Callable[[dict[str, Any]], dict[str, Any]]


@pytest.fixture(scope="module")
def edit_config() -> ConfigEdit:
    """What a module changes in ``base_config`` for all its tests, whichever target runs them
    (``config`` in-process, ``gateway_config`` under sidecar serve): nothing, unless the module
    overrides this fixture."""
    return lambda config: config


@pytest.fixture
def config(
    idp: TestIdP, client_keys: ClientKeys, sqlite_url: str, edit_config: ConfigEdit
) -> dict[str, Any]:
    """The configuration as a YAML-shaped mapping; tests may edit it before ``settings``."""
    return edit_config(base_config(idp, client_keys, sqlite_url))


@pytest.fixture
def settings(config: dict[str, Any]) -> Settings:
    return settings_from_mapping(config, env={})


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """``config`` as a YAML configuration file at ``path``."""
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def config_file(tmp_path: Path, config: dict[str, Any]) -> Path:
    """``config`` as the file ``sidecar --config`` reads: ``sidecar.yaml`` in the test's
    directory."""
    return write_config(tmp_path / "sidecar.yaml", config)


# Set-up for the command line's tests, done in-process: ``config_file`` with its database as a
# command would find it.


@pytest.fixture
def migrated(config_file: Path, config: dict[str, Any]) -> Path:
    """``config_file``, its database as ``sidecar db upgrade`` leaves it: the schema, no keys, no
    policies."""
    engine = make_engine(config["database_url"])
    migrate.upgrade(engine)
    engine.dispose()
    return config_file


@pytest.fixture
def started(config_file: Path) -> Path:
    """``config_file``, its database as ``sidecar serve`` leaves it: migrated, one signing key,
    the policies bootstrapped from the file."""
    make_services(load_settings(config_file)).close()
    return config_file


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
        query = (
            select(AuditEventRow)
            .where(AuditEventRow.id > after_id)
            .where(AuditEventRow.decision.in_(EXCHANGES))
        )
        return list(session.scalars(query.order_by(AuditEventRow.id)))


class LiveServer:
    """The real WSGI app served over HTTP on 127.0.0.1 in a background thread, on ``port`` or
    one the system chooses."""

    def __init__(self, app: Any, port: int = 0) -> None:
        self._server: BaseWSGIServer = make_server("127.0.0.1", port, app, threaded=True)
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
        """POST /token with :func:`exchange_params`."""
        form = exchange_params(subject_token, **params)
        return requests.post(self.token_url, data=form, auth=auth, timeout=10)


@pytest.fixture
def app(services: Services) -> Flask:
    """The app of ``services``, as a worker builds it (for Flask's test client)."""
    return create_app(services.settings, services)


@pytest.fixture
def credentials() -> dict[str, str]:
    """Admin API credentials (name -> token), new for each test: a module that enables the
    admin API gives its ``config`` these (``enable_admin``)."""
    return admin_credentials()


@pytest.fixture
def server(services: Services) -> Iterator[LiveServer]:
    live = LiveServer(create_app(services.settings, services))
    yield live
    live.stop()


@contextmanager
def live_service(config: dict[str, Any], **kwargs: Any) -> Iterator[tuple[Services, LiveServer]]:
    """For a test or fixture that builds its own: the service of ``config`` (``kwargs`` go to
    :class:`Services`), prepared, and its app on a :class:`LiveServer`; at the end the server
    stops and the service closes."""
    services = make_services(settings_from_mapping(config, env={}), **kwargs)
    server = LiveServer(create_app(services.settings, services))
    try:
        yield services, server
    finally:
        server.stop()
        services.close()


@pytest.fixture
def captured_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every log record of the service at DEBUG and above."""
    caplog.set_level(logging.DEBUG)
    return caplog


# --- make test runs on two workers (pytest-xdist, --dist loadgroup) -------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The functional tests outside http/ (servers started and stopped, floods, idle
    connections, wall-clock bounds, signals) run one after the other on one worker, as they do
    alone; the unit tests and the HTTP tests share the other. Without xdist the mark is inert."""
    for item in items:
        if item.nodeid.startswith("tests/functional/") and not item.nodeid.startswith(
            "tests/functional/http/"
        ):
            item.add_marker(pytest.mark.xdist_group("serial"))


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


# --- both targets: the in-process server and ``sidecar serve`` ---------------------------------
#
# A test that takes ``gateway`` runs on two targets: "in-process", the app on the werkzeug server
# above (``server`` and the function-scoped fixtures it chains: a new database per test), and
# "serve", the production command (``sidecar serve``: granian, its default two workers), started
# once per test module on a SQLite file of its own. A module edits the configuration of both by
# overriding ``edit_config``; ``config`` (in-process) and ``gateway_config`` (served,
# module-scoped) may each be overridden too, for one target alone.

GATEWAY_TARGETS = ("in-process", "serve")
# How long a test waits for ``sidecar serve`` to write the audit rows it expects (seconds).
AUDIT_WAIT = 10.0
# Each worker's audit writer writes its queue at least every 50 ms: after three times that, the
# records of every request answered before the wait began are in the database.
AUDIT_SETTLE = 0.15
# How long ``sidecar serve`` may take to stop gracefully before it is killed (seconds).
STOP_TIMEOUT = 10.0


class Gateway:
    """The service under test as an HTTP test sees it, whichever target runs it: its URLs,
    ``exchange`` (as :class:`LiveServer` has it), its audit rows and database, and the
    configuration, identity provider and client keys it was built from."""

    target: ClassVar[str]

    def __init__(
        self,
        url: str,
        config: dict[str, Any],
        idp: TestIdP,
        client_keys: ClientKeys,
        session: requests.Session | None = None,
    ) -> None:
        self.url = url
        self.token_url = f"{url}/token"
        self.config = config
        self.idp = idp
        self.client_keys = client_keys
        # With a session, the test's requests share one kept-alive connection, so that under
        # ``sidecar serve`` one worker answers them all (caches and rate limits are per worker,
        # and only the worker that served an admin API change sees it at once).
        self.session = session

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 10)
        if self.session is not None:
            return self.session.post(url, **kwargs)
        return requests.post(url, **kwargs)

    def exchange(
        self,
        subject_token: str | None,
        *,
        auth: tuple[str, str] | None = ("gateway", GATEWAY_SECRET),
        **params: Any,
    ) -> requests.Response:
        """POST /token with :func:`exchange_params`."""
        return self.post(self.token_url, data=exchange_params(subject_token, **params), auth=auth)

    @property
    def engine(self) -> Engine:
        """An engine on the service's database."""
        raise NotImplementedError

    @property
    def policy_store(self) -> PolicyStore:
        """The policy table, read and written as the service does."""
        raise NotImplementedError

    def audit_rows(self, *, after_id: int = 0, expected: int | None = None) -> list[AuditEventRow]:
        """The audit rows after ``after_id``, oldest first, once written. ``expected``: how many
        the caller's requests wrote (under ``sidecar serve``, waited for; in-process every
        queued event is written first anyway). Without it, every row of a request answered
        before the call is included."""
        raise NotImplementedError

    def last_audit_id(self, *, settle: bool = True) -> int:
        """The id of the newest audit row (0: none). With ``settle=False`` under ``sidecar
        serve``, the caller vouches that the rows of every request answered so far were waited
        for (``audit_rows(expected=...)``), and the read does not wait for the writer."""
        raise NotImplementedError

    def _max_audit_id(self) -> int:
        with self.engine.connect() as connection:
            newest = connection.scalar(select(func.coalesce(func.max(AuditEventRow.id), 0)))
        return int(newest or 0)

    def _read_audit_rows(self, after_id: int) -> list[AuditEventRow]:
        with sessionmaker(self.engine)() as session:
            query = (
                select(AuditEventRow)
                .where(AuditEventRow.id > after_id)
                .where(AuditEventRow.decision.in_(EXCHANGES))
            )
            return list(session.scalars(query.order_by(AuditEventRow.id)))


class InProcessGateway(Gateway):
    """The app on :class:`LiveServer`, with the test's own ``services``."""

    target = "in-process"

    def __init__(
        self,
        server: LiveServer,
        services: Services,
        config: dict[str, Any],
        idp: TestIdP,
        client_keys: ClientKeys,
    ) -> None:
        super().__init__(server.url, config, idp, client_keys)
        self.server = server
        self.services = services

    @property
    def engine(self) -> Engine:
        return self.services.engine

    @property
    def policy_store(self) -> PolicyStore:
        return self.services.policy_store

    def audit_rows(self, *, after_id: int = 0, expected: int | None = None) -> list[AuditEventRow]:
        return audit_rows(self.services, after_id=after_id)

    def last_audit_id(self, *, settle: bool = True) -> int:
        assert self.services.audit.flush(), "audit events still queued"
        return self._max_audit_id()


class ServedGateway(Gateway):
    """A running ``sidecar serve`` (started by :func:`start_served_gateway`), its database read
    through an engine of the test's own."""

    target = "serve"

    def __init__(
        self,
        served: Served,
        idp: TestIdP,
        client_keys: ClientKeys,
        engine: Engine,
        session: requests.Session | None = None,
    ) -> None:
        super().__init__(served.url, served.config, idp, client_keys, session)
        self.served = served
        self._engine = engine

    def view(self, *, keep_alive: bool) -> ServedGateway:
        """The same server for one test: with ``keep_alive``, over a connection of its own."""
        session = requests.Session() if keep_alive else None
        return ServedGateway(self.served, self.idp, self.client_keys, self._engine, session)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()

    def stop(self) -> None:
        """Stop the server and release the engine: SIGTERM, then ``kill()`` of whatever is left
        of its process group (always, from ``Served.stop``). A graceful stop takes a fraction of
        a second; after a SIGKILL alone, ``kill()`` waits a second or more for init to reap the
        workers."""
        self.close()
        try:
            self.served.stop(timeout=STOP_TIMEOUT)
        finally:
            self._engine.dispose()

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def policy_store(self) -> PolicyStore:
        return PolicyStore(sessionmaker(self._engine), time.time)

    def audit_rows(self, *, after_id: int = 0, expected: int | None = None) -> list[AuditEventRow]:
        if expected is None:
            time.sleep(AUDIT_SETTLE)
            return self._read_audit_rows(after_id)
        deadline = time.monotonic() + AUDIT_WAIT
        while True:
            rows = self._read_audit_rows(after_id)
            if len(rows) >= expected or time.monotonic() > deadline:
                return rows
            time.sleep(0.005)

    def last_audit_id(self, *, settle: bool = True) -> int:
        if settle:
            time.sleep(AUDIT_SETTLE)
        return self._max_audit_id()

    def log_size(self) -> int:
        """Where the server's output ends now (bytes): a mark for :meth:`log_since`."""
        return self.served.output.stat().st_size

    def log_since(self, offset: int) -> str:
        """What the server (supervisor, granian, every worker) wrote after ``offset``."""
        with self.served.output.open("rb") as output:
            output.seek(offset)
            return output.read().decode(errors="replace")


def start_served_gateway(
    directory: Path, config: dict[str, Any], idp: TestIdP, client_keys: ClientKeys
) -> ServedGateway:
    """``sidecar serve`` with ``config`` (its default server and workers) on a loopback port,
    through :func:`tests.launcher.start_serve`; the caller calls ``stop()``."""
    served = start_serve(directory, config)
    return ServedGateway(served, idp, client_keys, make_engine(served.database_url))


@pytest.fixture(scope="module", params=GATEWAY_TARGETS)
def gateway_target(request: pytest.FixtureRequest) -> str:
    """The target a ``gateway`` test runs on. Module-scoped, so that pytest runs a module's
    in-process tests first and its served ones after, each target set up once."""
    return str(request.param)


@pytest.fixture(scope="module")
def gateway_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def gateway_idp(gateway_directory: Path, idp_rsa_key: rsa.RSAPrivateKey) -> TestIdP:
    return TestIdP(gateway_directory, idp_rsa_key)


@pytest.fixture(scope="module")
def gateway_client_keys() -> ClientKeys:
    return ClientKeys()


@pytest.fixture(scope="module")
def gateway_config(
    gateway_idp: TestIdP,
    gateway_client_keys: ClientKeys,
    gateway_directory: Path,
    edit_config: ConfigEdit,
) -> dict[str, Any]:
    """The configuration of the module's ``sidecar serve``: ``base_config`` as ``edit_config``
    leaves it; a module may also override this fixture (module-scoped) to edit it for this
    target alone."""
    database_url = f"sqlite:///{gateway_directory / 'sidecar.db'}"
    return edit_config(base_config(gateway_idp, gateway_client_keys, database_url))


@pytest.fixture(scope="module")
def gateway_keep_alive() -> bool:
    """Whether, under ``sidecar serve``, each test's requests share one kept-alive connection
    (and so one worker); a module that needs it overrides this fixture to return True."""
    return False


@pytest.fixture(scope="module")
def served_gateway(
    gateway_directory: Path,
    gateway_config: dict[str, Any],
    gateway_idp: TestIdP,
    gateway_client_keys: ClientKeys,
) -> Iterator[ServedGateway]:
    """The module's ``sidecar serve``, started at its first served test, killed at its end."""
    served = start_served_gateway(
        gateway_directory, gateway_config, gateway_idp, gateway_client_keys
    )
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture
def gateway(
    request: pytest.FixtureRequest, gateway_target: str, gateway_keep_alive: bool
) -> Iterator[Gateway]:
    """The service under test, on each target in turn (see above)."""
    if gateway_target == "in-process":
        yield InProcessGateway(
            request.getfixturevalue("server"),
            request.getfixturevalue("services"),
            request.getfixturevalue("config"),
            request.getfixturevalue("idp"),
            request.getfixturevalue("client_keys"),
        )
        return
    served: ServedGateway = request.getfixturevalue("served_gateway")
    view = served.view(keep_alive=gateway_keep_alive)
    try:
        yield view
    finally:
        view.close()
