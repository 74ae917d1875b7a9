"""Engines, sessions and leases (sidecar/store/db.py): SQLite set up for several worker processes
(WAL, a busy timeout), PostgreSQL bounded on every wait, ``ping`` for the readiness probe, and
the named leases that serialise key rotation across every worker. Marked ``postgres``: against a
real PostgreSQL server."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, exc, select, text

from sidecar.store import migrate
from sidecar.store.db import (
    CLIENT_WAIT_SECONDS,
    CONNECT_TIMEOUT_SECONDS,
    SQLITE_BUSY_TIMEOUT_MS,
    STATEMENT_TIMEOUT_MS,
    hold_lease,
    holder_name,
    is_sqlite,
    make_engine,
    make_sessionmaker,
    observe_errors,
    ping,
)
from sidecar.store.models import LeaseRow
from tests.launcher import free_port


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'sidecar.db'}")
    yield engine
    engine.dispose()


@pytest.fixture
def postgres_engine(postgres_url: str) -> Iterator[Engine]:
    engine = make_engine(postgres_url)
    yield engine
    engine.dispose()


# --- SQLite ---------------------------------------------------------------------------------------


def test_each_sqlite_connection_uses_wal_and_waits_for_a_busy_writer(
    sqlite_engine: Engine,
) -> None:
    with sqlite_engine.connect() as connection:
        pragmas = {
            name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "busy_timeout", "synchronous", "foreign_keys")
        }
    assert pragmas == {
        "journal_mode": "wal",
        "busy_timeout": SQLITE_BUSY_TIMEOUT_MS,
        "synchronous": 1,  # NORMAL: safe with WAL, no fsync per commit
        "foreign_keys": 1,
    }


def test_a_new_connection_gets_the_pragmas_too(sqlite_engine: Engine) -> None:
    with sqlite_engine.connect() as first, sqlite_engine.connect() as second:
        assert first.connection.dbapi_connection is not second.connection.dbapi_connection
        timeout = second.exec_driver_sql("PRAGMA busy_timeout").scalar()
    assert timeout == SQLITE_BUSY_TIMEOUT_MS


def test_a_writer_waits_for_another_writer_instead_of_failing(
    sqlite_engine: Engine, tmp_path: Path
) -> None:
    import sqlite3

    blocker = sqlite3.connect(
        tmp_path / "sidecar.db", isolation_level=None, check_same_thread=False
    )
    with sqlite_engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock
    release = threading.Timer(0.2, blocker.execute, ("COMMIT",))
    release.start()
    try:
        with sqlite_engine.begin() as connection:  # waits up to the busy timeout
            connection.exec_driver_sql("INSERT INTO t VALUES (1)")
    finally:
        release.join()
        blocker.close()
    with sqlite_engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT x FROM t").scalar() == 1


def test_the_sqlite_files_directory_is_created(tmp_path: Path) -> None:
    path = tmp_path / "var" / "lib" / "sidecar.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        ping(engine)
    finally:
        engine.dispose()
    assert path.is_file()


def test_a_pooled_sqlite_connection_may_serve_another_thread(sqlite_engine: Engine) -> None:
    ping(sqlite_engine)  # one connection made here, back in the pool
    failures: list[BaseException] = []

    def other_thread() -> None:
        try:
            ping(sqlite_engine)
        except BaseException as error:
            failures.append(error)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert failures == []


def test_ping_fails_when_the_database_cannot_be_opened(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.db"
    path.mkdir()  # a directory where the database file should be
    engine = make_engine(f"sqlite:///{path}")
    try:
        with pytest.raises(exc.OperationalError):
            ping(engine)
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("url", "sqlite"),
    [
        ("sqlite:///var/sidecar.db", True),
        ("sqlite+pysqlite:///x.db", True),
        ("postgresql+psycopg://u@h/db", False),
        ("postgresql://u@h/db", False),
    ],
)
def test_is_sqlite(url: str, sqlite: bool) -> None:
    assert is_sqlite(url) is sqlite


# --- sessions and leases --------------------------------------------------------------------------


def test_objects_stay_readable_after_their_session_commits(sqlite_engine: Engine) -> None:
    migrate.upgrade(sqlite_engine)
    sessions = make_sessionmaker(sqlite_engine)
    with sessions() as session, session.begin():
        lease = session.scalars(select(LeaseRow).where(LeaseRow.name == "keyring")).one()
    sqlite_engine.dispose()  # no database behind it any more: nothing may be reloaded
    assert lease.name == "keyring"


def test_a_lease_records_its_holder_until_commit(sqlite_engine: Engine) -> None:
    migrate.upgrade(sqlite_engine)
    sessions = make_sessionmaker(sqlite_engine)
    before = time.time()

    with sessions() as session, session.begin():
        hold_lease(session, "keyring")

    with sessions() as session:
        lease = session.get(LeaseRow, "keyring")
    assert lease is not None
    assert lease.holder == f"{socket.gethostname()}:{os.getpid()}" == holder_name()
    assert lease.acquired_at is not None
    assert before <= lease.acquired_at <= time.time()


def test_a_missing_lease_says_to_upgrade_the_database(sqlite_engine: Engine) -> None:
    migrate.upgrade(sqlite_engine)
    sessions = make_sessionmaker(sqlite_engine)
    with (
        sessions() as session,
        session.begin(),
        pytest.raises(RuntimeError, match=r"lease 'nothing' is missing; run `sidecar db upgrade`"),
    ):
        hold_lease(session, "nothing")


# --- PostgreSQL -----------------------------------------------------------------------------------


def test_ping_fails_fast_when_postgresql_is_unreachable() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/test")
    started = time.monotonic()
    try:
        with pytest.raises(exc.OperationalError):
            ping(engine)
    finally:
        engine.dispose()
    assert time.monotonic() - started < CONNECT_TIMEOUT_SECONDS + 1


@pytest.mark.postgres
def test_postgresql_sessions_have_the_statement_timeout_and_the_application_name(
    postgres_engine: Engine,
) -> None:
    with postgres_engine.connect() as connection:
        timeout = connection.execute(text("SHOW statement_timeout")).scalar()
        name = connection.execute(text("SHOW application_name")).scalar()
    assert timeout == f"{STATEMENT_TIMEOUT_MS // 1000}s"
    assert name == "token-exchange-sidecar"


@pytest.mark.postgres
def test_the_postgresql_pool_is_bounded_and_checks_connections(postgres_engine: Engine) -> None:
    pool = postgres_engine.pool
    assert pool.size() == 5  # type: ignore[attr-defined]
    assert pool._max_overflow == 5  # type: ignore[attr-defined]
    assert pool._timeout == CONNECT_TIMEOUT_SECONDS  # type: ignore[attr-defined]
    assert pool._pre_ping is True


@pytest.mark.postgres
def test_a_server_that_does_not_answer_is_given_up_on_by_the_client(
    postgres_engine: Engine,
) -> None:
    # The server's statement_timeout switched off for this session: only the client-side bound
    # is left (a stalled network, an overloaded server look the same from here).
    with postgres_engine.connect() as connection:
        connection.execute(text("SET statement_timeout = 0"))
        started = time.monotonic()
        with pytest.raises(exc.OperationalError, match="the database did not answer in time"):
            connection.execute(text("SELECT pg_sleep(:s)"), {"s": CLIENT_WAIT_SECONDS + 5})
        waited = time.monotonic() - started
    assert CLIENT_WAIT_SECONDS - 0.1 <= waited < CLIENT_WAIT_SECONDS + 1
    ping(postgres_engine)  # the pool replaced the connection it gave up on


@pytest.mark.postgres
def test_a_lease_is_held_until_commit_across_connections(postgres_engine: Engine) -> None:
    sessions = make_sessionmaker(postgres_engine)
    with sessions() as holder, holder.begin():
        hold_lease(holder, "keyring")
        with postgres_engine.connect() as other:
            other.execute(text("SET lock_timeout = '100ms'"))
            with pytest.raises(exc.OperationalError, match="lock timeout"):
                other.execute(text("UPDATE leases SET holder = 'other' WHERE name = 'keyring'"))


def test_the_database_section_sets_the_pool_timeouts_and_tls() -> None:
    from sidecar.config import DatabaseConfig
    from sidecar.store.db import postgres_connect_args

    options = DatabaseConfig.model_validate(
        {
            "pool_size": 3,
            "pool_timeout": "4s",
            "connect_timeout": "7s",
            "statement_timeout": "9s",
            "sslmode": "verify-full",
            "sslrootcert": "/etc/sidecar/ca.pem",
        }
    )
    engine = make_engine("postgresql+psycopg://sidecar@db.invalid:5432/sidecar", options)
    try:
        assert engine.pool.size() == 3  # type: ignore[attr-defined]
        assert engine.pool.timeout() == 4  # type: ignore[attr-defined]
    finally:
        engine.dispose()
    assert postgres_connect_args(options) == {
        "connect_timeout": 7,
        "options": "-c statement_timeout=9000",
        "application_name": "token-exchange-sidecar",
        "sslmode": "verify-full",
        "sslrootcert": "/etc/sidecar/ca.pem",
    }


def test_observe_errors_counts_a_failed_connection_by_kind() -> None:
    seen: list[str] = []
    engine = make_engine(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none")
    observe_errors(engine, seen.append)

    with pytest.raises(exc.OperationalError):
        ping(engine)

    assert seen == ["OperationalError"]


def test_observe_errors_does_not_count_a_constraint_violation(sqlite_engine: Engine) -> None:
    seen: list[str] = []
    observe_errors(sqlite_engine, seen.append)
    with sqlite_engine.begin() as connection:
        connection.execute(text("CREATE TABLE once (name TEXT PRIMARY KEY)"))
        connection.execute(text("INSERT INTO once VALUES ('a')"))

    with pytest.raises(exc.IntegrityError), sqlite_engine.begin() as connection:
        connection.execute(text("INSERT INTO once VALUES ('a')"))
    with pytest.raises(exc.OperationalError), sqlite_engine.begin() as connection:
        connection.execute(text("SELECT * FROM no_such_table"))

    assert seen == ["OperationalError"]
