"""Engine set-up, sessions and cross-process locks for SQLite and PostgreSQL."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text, update
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from sidecar.config import DatabaseConfig
from sidecar.store.models import LeaseRow

# Every database operation is bounded: a slow or unreachable database becomes a 503, not a hang
# (database.connect_timeout, database.statement_timeout; these are their defaults).
DEFAULTS = DatabaseConfig.model_validate({})
CONNECT_TIMEOUT_SECONDS = round(DEFAULTS.connect_timeout)
STATEMENT_TIMEOUT_MS = round(DEFAULTS.statement_timeout * 1000)
# The client-side bound on any one wait for the server (PostgreSQL); see BoundedConnection.
# Longer than the statement timeout (make_engine sets it one second longer), so that a slow
# statement is cancelled by the server (the connection stays usable) before the client gives
# the connection up.
CLIENT_WAIT_SECONDS = 3.0
SQLITE_BUSY_TIMEOUT_MS = 3000


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers proceed while a worker writes; busy_timeout makes writers wait briefly
    # for each other instead of failing at once.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str, options: DatabaseConfig | None = None) -> Engine:
    """The engine of ``database_url``, with ``database:``'s pool, timeouts and TLS on
    PostgreSQL."""
    options = options or DEFAULTS
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    global CLIENT_WAIT_SECONDS
    CLIENT_WAIT_SECONDS = options.statement_timeout + 1.0
    engine = create_engine(
        url,
        pool_pre_ping=True,
        pool_size=options.pool_size,
        max_overflow=options.max_overflow,
        pool_timeout=options.pool_timeout,
        connect_args=postgres_connect_args(options),
    )
    if parsed.get_driver_name() == "psycopg":
        event.listen(engine, "do_connect", _connect_bounded)
    return engine


def postgres_connect_args(options: DatabaseConfig) -> dict[str, Any]:
    """libpq's connection parameters of ``database:``."""
    connect_args: dict[str, Any] = {
        "connect_timeout": max(1, round(options.connect_timeout)),
        "options": f"-c statement_timeout={round(options.statement_timeout * 1000)}",
        "application_name": "token-exchange-sidecar",
    }
    for name in ("sslmode", "sslrootcert", "sslcert", "sslkey"):
        value = getattr(options, name)
        if value is not None:
            connect_args[name] = str(value)
    return connect_args


def _connect_bounded(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
    return _BoundedConnection.connect(*cargs, **cparams)


def _bounded_connection_class() -> Any:
    import psycopg
    from psycopg.errors import _WaitTimeout

    class BoundedConnection(psycopg.Connection):
        """A psycopg connection whose every wait on the server is bounded client-side.

        ``statement_timeout`` is enforced by the server, and ``connect_timeout`` covers only
        the connection set-up: a stalled network or an overloaded server would otherwise hold a
        request (and its worker thread) indefinitely. After ``CLIENT_WAIT_SECONDS`` the
        connection is closed and the call fails, which the service answers with a 503.
        """

        def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
            try:
                return super().wait(
                    gen, interval, CLIENT_WAIT_SECONDS if timeout is None else timeout
                )
            except _WaitTimeout:
                self.pgconn.finish()
                raise psycopg.OperationalError("the database did not answer in time") from None

    return BoundedConnection


class _LazyBoundedConnection:
    # psycopg is an optional dependency: built on first use, not at import.
    _class: Any = None

    def connect(self, *args: Any, **kwargs: Any) -> Any:
        if self._class is None:
            type(self)._class = _bounded_connection_class()
        return self._class.connect(*args, **kwargs)


_BoundedConnection = _LazyBoundedConnection()


def observe_errors(engine: Engine, observe: Callable[[str], None]) -> None:
    """Call ``observe(kind)`` for each error the database raises through ``engine``, failed
    connections included; ``kind`` is SQLAlchemy's class for it (``OperationalError``, ...).
    Constraint violations are answers, not failures (a replayed ``jti``, a taken name): not
    counted."""

    def on_error(context: ExceptionContext) -> None:
        error = context.sqlalchemy_exception or context.original_exception
        if not isinstance(error, IntegrityError):
            observe(type(error).__name__)

    event.listen(engine, "handle_error", on_error)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def holder_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def hold_lease(session: Session, name: str) -> None:
    """Hold the named lease for the rest of the session's transaction.

    Updating the lease row takes a write lock on it (a row lock in PostgreSQL, the database write
    lock in SQLite) that is held until commit or rollback, so at most one process in the whole
    deployment is inside the block for a given name.
    """
    result = session.execute(
        update(LeaseRow)
        .where(LeaseRow.name == name)
        .values(holder=holder_name(), acquired_at=time.time())
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise RuntimeError(f"lease {name!r} is missing; run `sidecar db upgrade`")
