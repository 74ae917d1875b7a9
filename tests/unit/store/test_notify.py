"""Change notifications (sidecar/store/notify.py): a change committed on one PostgreSQL connection
reaches the listener on another, which reloads the matching holder. Two real connections, no
stand-ins: the listener's own (``LISTEN``) and the engine's the test writes with. Marked
``postgres`` where a server is needed."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.event import listen as event_listen
from sqlalchemy.orm import Session

from sidecar.config.deployment import DatabaseConfig
from sidecar.refreshing import Refreshing
from sidecar.store.db import make_engine
from sidecar.store.notify import (
    APPLICATION_NAME,
    CHANNEL,
    KEYS,
    PING_AFTER_SECONDS,
    POLICIES,
    POLL_SECONDS,
    ChangeListener,
    _connect,
    listen_conninfo,
    notify_change,
)
from tests.conftest import FakeClock

WAIT = 5.0  # seconds a test waits at most for the listener's thread
PASSWORD = "pw-never-logged-7f3a"


class Counted:
    """A holder whose loads are counted, and a way to wait for the next one."""

    def __init__(self, name: str, fail_first: int = 0) -> None:
        self.loads = 0
        self.fail_first = fail_first
        self._changed = threading.Condition()
        self.holder: Refreshing[int] = Refreshing(name, self._load, 3600.0, time.monotonic)

    def _load(self) -> int:
        with self._changed:
            self.loads += 1
            self._changed.notify_all()
            if self.loads <= self.fail_first:
                raise RuntimeError("the database refused the load")
            return self.loads

    def wait_for(self, loads: int) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.loads >= loads, WAIT)


@pytest.fixture
def policies() -> Counted:
    return Counted(POLICIES)


@pytest.fixture
def keys() -> Counted:
    return Counted(KEYS)


@pytest.fixture
def engine(postgres_url: str) -> Iterator[Engine]:
    engine = make_engine(postgres_url)
    yield engine
    engine.dispose()


@pytest.fixture
def start_listener(
    postgres_url: str, policies: Counted, keys: Counted
) -> Iterator[Callable[..., ChangeListener]]:
    """Starts a listener on the test database (its URL with a password in it, which trust
    authentication ignores) for the two holders, and stops it after the test."""
    started: list[ChangeListener] = []

    def start(*, conninfo: str | None = None, **options: Any) -> ChangeListener:
        if conninfo is None:
            url = make_url(postgres_url).set(password=PASSWORD)
            conninfo = listen_conninfo(url.render_as_string(hide_password=False))
        assert conninfo is not None
        listener = ChangeListener(
            conninfo, {POLICIES: policies.holder, KEYS: keys.holder}, **options
        )
        started.append(listener)
        listener.start()
        return listener

    yield start
    for listener in started:
        listener.stop()


def listening(start: Callable[..., ChangeListener], **options: Any) -> ChangeListener:
    listener = start(**options)
    assert listener.listening.wait(WAIT)
    return listener


@pytest.fixture
def listener(start_listener: Callable[..., ChangeListener]) -> ChangeListener:
    """A listener with the default options, listening before the test begins."""
    return listening(start_listener)


def on_the_listeners_connection(engine: Engine, select: str) -> list[Any]:
    """``SELECT select`` for the listener's connection, as pg_stat_activity shows it to the
    engine's own (``select`` may name its columns: ``query``, ``pid``)."""
    with engine.begin() as connection:
        return list(
            connection.execute(
                text(
                    f"SELECT {select} FROM pg_stat_activity "
                    "WHERE application_name = :name AND datname = current_database()"
                ),
                {"name": APPLICATION_NAME},
            ).scalars()
        )


def commit_notification(engine: Engine, *what: str, rollback: bool = False) -> None:
    """One transaction on the engine's connection that announces ``what`` and commits."""
    with Session(engine) as session, session.begin():
        for each in what:
            notify_change(session, each)
        if rollback:
            session.rollback()


def listener_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "listen-changes"]


# --- the notification ---------------------------------------------------------------------------


def test_the_conninfo_is_the_urls_with_its_password_and_the_default_timeouts() -> None:
    conninfo = listen_conninfo(f"postgresql+psycopg://sidecar:{PASSWORD}@db:5433/s?sslmode=require")
    assert conninfo is not None
    assert conninfo_to_dict(conninfo) == {
        "host": "db",
        "port": "5433",
        "dbname": "s",
        "user": "sidecar",
        "password": PASSWORD,
        "sslmode": "require",
        "connect_timeout": "2",
        "options": "-c statement_timeout=2000",
    }


def test_the_tls_parameters_and_timeouts_of_database_reach_the_listener() -> None:
    """The listener's connection carries the password too: it must never be the one connection
    made without the TLS the configuration asks for."""
    options = DatabaseConfig(
        sslmode="verify-full",
        sslrootcert=Path("/etc/sidecar/ca.pem"),
        sslcert=Path("/etc/sidecar/client.pem"),
        sslkey=Path("/etc/sidecar/client.key"),
        connect_timeout=7,
        statement_timeout=3.5,
    )
    conninfo = listen_conninfo("postgresql+psycopg://sidecar@db/s?sslmode=disable", options)
    assert conninfo is not None
    parsed = conninfo_to_dict(conninfo)
    assert {k: parsed[k] for k in ("sslmode", "sslrootcert", "sslcert", "sslkey")} == {
        "sslmode": "verify-full",  # database: wins over the URL, as for the engine's connections
        "sslrootcert": "/etc/sidecar/ca.pem",
        "sslcert": "/etc/sidecar/client.pem",
        "sslkey": "/etc/sidecar/client.key",
    }
    assert (parsed["connect_timeout"], parsed["options"]) == ("7", "-c statement_timeout=3500")


def test_a_password_with_spaces_and_quotes_survives_the_conninfo() -> None:
    conninfo = listen_conninfo("postgresql+psycopg://sidecar:p%20w%27%3D%40x@db/s")
    assert conninfo is not None
    assert conninfo_to_dict(conninfo)["password"] == "p w'=@x"


@pytest.mark.postgres
def test_the_listener_never_connects_without_the_tls_it_is_asked_for(postgres_url: str) -> None:
    plain = listen_conninfo(postgres_url)
    conninfo = listen_conninfo(postgres_url, DatabaseConfig(sslmode="require"))
    assert plain is not None
    assert conninfo is not None
    with _connect(plain) as connection:
        server_has_tls = connection.execute("SHOW ssl").fetchone() == ("on",)
    if not server_has_tls:  # libpq refuses, as asked, rather than connect in clear text
        with pytest.raises(psycopg.OperationalError, match="SSL"):
            _connect(conninfo)
        return
    with _connect(conninfo) as connection:
        row = connection.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert row.fetchone() == (True,)


@pytest.mark.postgres
def test_the_listener_has_the_statement_timeout_of_database(postgres_url: str) -> None:
    conninfo = listen_conninfo(postgres_url, DatabaseConfig(statement_timeout=3.5))
    assert conninfo is not None
    with _connect(conninfo) as connection:
        assert connection.execute("SHOW statement_timeout").fetchone() == ("3500ms",)


def test_there_is_no_conninfo_for_sqlite(tmp_path: Path) -> None:
    assert listen_conninfo(f"sqlite:///{tmp_path / 'sidecar.db'}") is None


def test_on_sqlite_a_change_is_announced_by_nothing(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'sidecar.db'}")
    statements: list[str] = []
    try:
        with Session(engine) as session, session.begin():
            session.execute(text("SELECT 1"))
            event_listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
            notify_change(session, POLICIES)
    finally:
        engine.dispose()
    assert statements == []


@pytest.mark.postgres
def test_a_committed_policy_change_reloads_the_policies_only(
    listener: ChangeListener, engine: Engine, policies: Counted, keys: Counted
) -> None:
    commit_notification(engine, POLICIES)

    assert policies.wait_for(1)
    assert policies.holder.current == 1
    # Had the keyring been reloaded too, it would have been first (holders reload by name).
    assert keys.loads == 0
    assert listener.reloads == 1


@pytest.mark.postgres
@pytest.mark.usefixtures("listener")
def test_a_committed_key_change_reloads_the_keyring_only(
    engine: Engine, policies: Counted, keys: Counted
) -> None:
    commit_notification(engine, KEYS)
    commit_notification(engine, POLICIES)  # delivered after the first: a marker

    assert policies.wait_for(1)
    assert keys.loads == 1


@pytest.mark.postgres
@pytest.mark.usefixtures("listener")
def test_a_rolled_back_change_reloads_nothing(
    engine: Engine, policies: Counted, keys: Counted
) -> None:
    commit_notification(engine, POLICIES, rollback=True)
    commit_notification(engine, KEYS)  # delivered in commit order: after any earlier one

    assert keys.wait_for(1)
    assert policies.loads == 0


@pytest.mark.postgres
def test_an_unknown_payload_reloads_every_holder(
    listener: ChangeListener, engine: Engine, policies: Counted, keys: Counted
) -> None:
    with engine.begin() as connection:
        connection.execute(text("SELECT pg_notify(:c, 'clients')"), {"c": CHANNEL})

    assert policies.wait_for(1)
    assert keys.wait_for(1)
    assert listener.reloads == 2


@pytest.mark.postgres
def test_a_reload_that_fails_is_logged_and_the_listener_goes_on(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    failing = Counted(POLICIES, fail_first=1)
    conninfo = listen_conninfo(engine.url.render_as_string(hide_password=False))
    assert conninfo is not None
    listener = ChangeListener(conninfo, {POLICIES: failing.holder})
    listener.start()
    try:
        assert listener.listening.wait(WAIT)
        commit_notification(engine, POLICIES)
        assert failing.wait_for(1)
        commit_notification(engine, POLICIES)
        assert failing.wait_for(2)
    finally:
        listener.stop()

    assert failing.holder.current == 2
    assert "change listener: reloading policies failed: RuntimeError" in caplog.text


@pytest.mark.postgres
def test_a_reload_invalidates_the_holder_before_loading(
    start_listener: Callable[..., ChangeListener],
    engine: Engine,
    policies: Counted,
) -> None:
    # While the listener reloads, a request must not decide on the copy the change made stale.
    ages: list[float] = []
    policies.holder.refresh()
    policies.holder.report_loaded_at = ages.append
    listening(start_listener)

    commit_notification(engine, POLICIES)

    assert policies.wait_for(2)
    assert ages[0] == float("-inf")  # invalidated first ...
    assert ages[-1] > 0  # ... then loaded


# --- the connection -------------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.usefixtures("listener")
def test_the_listener_uses_a_connection_of_its_own(engine: Engine) -> None:
    assert on_the_listeners_connection(engine, "query") == [f"LISTEN {CHANNEL}"]


@pytest.mark.postgres
def test_a_quiet_connection_is_checked_once_its_clock_says_so(
    start_listener: Callable[..., ChangeListener], engine: Engine
) -> None:
    clock = FakeClock(1_000.0)
    listening(start_listener, clock=clock)

    clock.advance(PING_AFTER_SECONDS)

    def last_query() -> str | None:
        return next(iter(on_the_listeners_connection(engine, "query")), None)

    deadline = time.monotonic() + WAIT
    while last_query() != "SELECT 1" and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS / 5)
    assert last_query() == "SELECT 1"


@pytest.mark.postgres
def test_after_its_connection_is_killed_it_listens_again_and_reloads_what_it_holds(
    start_listener: Callable[..., ChangeListener],
    engine: Engine,
    policies: Counted,
    keys: Counted,
) -> None:
    policies.holder.refresh()  # held; the keyring is not (its first use will load it)
    listener = listening(start_listener)

    on_the_listeners_connection(engine, "pg_terminate_backend(pid)")

    assert policies.wait_for(2)  # caught up on what changed while nobody listened
    assert listener.connections == 2
    commit_notification(engine, POLICIES)  # and listening again
    assert policies.wait_for(3)
    assert keys.loads == 0


# --- stopping and logging -------------------------------------------------------------------------


@pytest.mark.postgres
def test_stop_ends_the_thread(listener: ChangeListener) -> None:
    assert len(listener_threads()) == 1

    started = time.monotonic()
    listener.stop()

    assert time.monotonic() - started < POLL_SECONDS + 1
    assert listener_threads() == []
    assert not listener.listening.is_set()


@pytest.mark.postgres
def test_start_twice_runs_one_thread(listener: ChangeListener) -> None:
    listener.start()
    assert len(listener_threads()) == 1


def test_the_url_is_never_logged_when_the_server_cannot_be_reached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    caplog.set_level(logging.DEBUG)
    conninfo = f"postgresql://sidecar:{PASSWORD}@127.0.0.1:{port}/sidecar"
    listener = ChangeListener(conninfo, {POLICIES: Counted(POLICIES).holder})
    listener.start()
    try:
        deadline = time.monotonic() + WAIT
        while "cannot connect" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        listener.stop()

    assert "change listener: cannot connect (OperationalError); retrying in" in caplog.text
    assert PASSWORD not in caplog.text
    assert f"127.0.0.1:{port}" not in caplog.text
    assert listener_threads() == []


@pytest.mark.postgres
def test_the_url_is_never_logged_when_the_connection_is_lost(
    start_listener: Callable[..., ChangeListener],
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    listener = listening(start_listener)

    on_the_listeners_connection(engine, "pg_terminate_backend(pid)")
    deadline = time.monotonic() + WAIT
    while listener.connections < 2 and time.monotonic() < deadline:
        time.sleep(0.02)

    assert listener.connections == 2
    assert "change listener: connection lost" in caplog.text
    assert PASSWORD not in caplog.text
    assert engine.url.database not in caplog.text  # nor any other part of the URL
