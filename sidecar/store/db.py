"""Engine set-up, sessions and cross-process locks for SQLite and PostgreSQL."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from sidecar.store.models import LeaseRow

# Every database operation is bounded: a slow or unreachable database becomes a 503, not a hang.
CONNECT_TIMEOUT_SECONDS = 3
STATEMENT_TIMEOUT_MS = 3000
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


def make_engine(url: str) -> Engine:
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
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=5,
        pool_timeout=CONNECT_TIMEOUT_SECONDS,
        connect_args={
            "connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
            "application_name": "token-exchange-sidecar",
        },
    )


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
