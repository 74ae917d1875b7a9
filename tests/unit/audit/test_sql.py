"""The audit INSERTs (sidecar/audit/sql.py): compiled once per dialect and row count, parameters
by position on SQLite and by name on PostgreSQL, one statement of one JSON text per batch on
SQLite 3.38+, and the columns cut to their size instead of failing a batch. Rows are written to a
real SQLite file and, marked ``postgres``, to a real PostgreSQL database."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.event import listen as event_listen

from sidecar.audit import (
    DENIED,
    FIELDS,
    GRANTED,
    MAX_ROWS_PER_INSERT,
    MAX_TEXT,
    ROWS_PER_INSERT,
    AuditEvent,
    AuditTrail,
)
from sidecar.audit.log import event_values, log_line
from sidecar.audit.redact import TRUNCATED, storable_values
from sidecar.audit.sql import (
    event_row,
    insert_rows,
    insert_sql,
    json_insert_sql,
    rows_per_insert,
)
from sidecar.store.db import make_engine
from sidecar.store.migrate import upgrade
from sidecar.store.models import AuditEventRow
from tests.unit.support import (
    SLOW_FLUSH,
    AuditDatabase,
    audit_event,
    flushed,
    grant_event,
    stored_audit_rows,
)

SQLITE = sqlite.dialect()
POSTGRESQL = postgresql.psycopg.dialect()  # type: ignore[attr-defined]


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """A migrated SQLite file, or the migrated PostgreSQL test database (emptied)."""
    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def rows_for(engine: Engine, events: list[AuditEvent]) -> list[Any]:
    """What the audit trail queues for ``events`` on this database: their JSON log lines where
    one INSERT takes a JSON text (SQLite), their column tuples elsewhere."""
    values = [storable_values(item) for item in events]
    if json_insert_sql(engine.dialect) is not None:
        return [log_line(each) for each in values]
    return [event_row(each) for each in values]


def stored_values(row: AuditEventRow) -> dict[str, Any]:
    stored = {name: getattr(row, name) for name in FIELDS}
    stored["audiences"] = json.loads(row.audiences or "")
    return stored


FULL_EVENT = grant_event(at=1_700_000_000.123456, subject="üser-ñ", expires_at=1_700_000_120.5)


# --- the statements -----------------------------------------------------------------------------


def test_the_insert_names_the_event_fields_in_order() -> None:
    sql, *_ = insert_sql(SQLITE, 1)
    assert sql.startswith(f"INSERT INTO audit_events ({', '.join(FIELDS)}) VALUES ")


def test_on_sqlite_the_parameters_go_by_position_one_row_after_another() -> None:
    sql, parameters, positional, row_major = insert_sql(SQLITE, 3)

    assert (positional, row_major) == (True, True)
    one_row = "(" + ", ".join(["?"] * len(FIELDS)) + ")"
    assert sql.endswith(" VALUES " + ", ".join([one_row] * 3))
    assert parameters == tuple(
        (f"{name}_{row}", row, column) for row in range(3) for column, name in enumerate(FIELDS)
    )


def test_on_postgresql_the_parameters_go_by_name_each_once() -> None:
    sql, parameters, positional, row_major = insert_sql(POSTGRESQL, 3)

    assert (positional, row_major) == (False, False)
    named = re.findall(r"%\((\w+)\)s", sql)
    assert sorted(named) == sorted(key for key, _, _ in parameters)
    assert {(row, column) for _, row, column in parameters} == {
        (row, column) for row in range(3) for column in range(len(FIELDS))
    }
    assert all(key == f"{FIELDS[column]}_{row}" for key, row, column in parameters)


def test_a_statement_is_compiled_once_per_dialect_and_row_count() -> None:
    assert insert_sql(SQLITE, 5) is insert_sql(SQLITE, 5)
    assert insert_sql(SQLITE, 5) is not insert_sql(SQLITE, 6)
    assert insert_sql(POSTGRESQL, 5) is not insert_sql(SQLITE, 5)


def test_on_sqlite_one_statement_takes_a_json_array_as_its_one_parameter() -> None:
    sql = json_insert_sql(SQLITE)

    assert sql is not None
    assert sql.startswith(f"INSERT INTO audit_events ({', '.join(FIELDS)}) SELECT ")
    assert sql.endswith(" FROM json_each(?) ORDER BY key")
    assert sql.count("?") == 1


def test_the_json_insert_cuts_exactly_the_bounded_columns() -> None:
    sql = json_insert_sql(SQLITE)
    assert sql is not None
    cut = re.findall(r"substr\(json_extract\(value, '\$\.(\w+)'\), 1, (\d+)\)", sql)
    assert cut == [(name, str(MAX_TEXT)) for name in FIELDS if name in TRUNCATED]


def test_there_is_no_json_insert_on_postgresql() -> None:
    assert json_insert_sql(POSTGRESQL) is None


def test_a_whole_batch_is_one_insert_on_sqlite_and_64_rows_elsewhere() -> None:
    assert rows_per_insert(SQLITE) == MAX_ROWS_PER_INSERT
    assert rows_per_insert(POSTGRESQL) == ROWS_PER_INSERT
    assert ROWS_PER_INSERT >= 32
    # 64 rows stay under the 999 parameters of the oldest SQLite builds.
    assert ROWS_PER_INSERT * len(FIELDS) <= 999


# --- the rows -----------------------------------------------------------------------------------


def test_an_event_row_holds_its_columns_in_field_order() -> None:
    row = event_row(storable_values(FULL_EVENT))

    assert len(row) == len(FIELDS)
    expected = {name: getattr(FULL_EVENT, name) for name in FIELDS}
    expected["audiences"] = json.dumps(FULL_EVENT.audiences, separators=(",", ":"))
    assert dict(zip(FIELDS, row, strict=True)) == expected


def test_an_event_row_stores_the_audiences_as_ascii_json() -> None:
    row = event_row(storable_values(AuditEvent(at=1.0, audiences=["https://ü.example"])))
    audiences = row[FIELDS.index("audiences")]
    assert audiences.isascii()
    assert json.loads(audiences) == ["https://ü.example"]


def test_an_event_row_cuts_the_bounded_columns_only() -> None:
    long = "v" * 1000
    values = event_values(AuditEvent(at=1.0, **dict.fromkeys(TRUNCATED, long), scope=long))

    row = dict(zip(FIELDS, event_row(values), strict=True))

    assert {name: row[name] for name in TRUNCATED} == dict.fromkeys(TRUNCATED, "v" * MAX_TEXT)
    assert row["scope"] == long  # a Text column: the redaction bounds it, not the row


def test_insert_rows_writes_every_field_of_every_row(engine: Engine) -> None:
    events = [
        FULL_EVENT,
        AuditEvent(at=1_700_000_001.5, error="invalid_target", reason="no policy", client_id="g"),
    ]
    with engine.begin() as connection:
        insert_rows(connection, rows_for(engine, events))

    stored = [stored_values(row) for row in stored_audit_rows(engine)]
    assert stored == [{name: getattr(item, name) for name in FIELDS} for item in events]


def test_column_cuts_count_characters_not_bytes(engine: Engine) -> None:
    wide = "ü" * 300  # 600 bytes in UTF-8
    with engine.begin() as connection:
        insert_rows(connection, rows_for(engine, [AuditEvent(at=1.0, actor=wide)]))

    [row] = stored_audit_rows(engine)
    assert row.actor == "ü" * MAX_TEXT


# --- batches written by the audit trail ----------------------------------------------------------


def test_a_batch_is_one_insert_of_one_text_on_sqlite(db: AuditDatabase) -> None:
    # One statement per batch: one step outside the GIL, and SQLite's write lock (shared by the
    # workers) held only that long. One text for every batch size: the driver's statement cache
    # keeps one prepared statement, not one per size.
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("INSERT INTO audit_events"):
            statements.append(statement)

    event_listen(db.engine, "before_cursor_execute", seen)
    trail = db.trail(flush_interval=SLOW_FLUSH, batch_size=500)
    for size in (500, 7, 1):
        for n in range(size):
            trail.record(audit_event(f"user-{size}-{n}"))
        assert flushed(trail)
    assert len(statements) == 3
    assert len(set(statements)) == 1
    assert len(db.rows()) == 508
    assert db.subjects()[:2] == ["user-500-0", "user-500-1"]  # in the order recorded


def test_a_batch_of_many_multi_row_inserts_writes_every_field_of_every_event(
    database_url: str,
) -> None:
    # Full multi-row INSERTs and shorter last ones, on SQLite (parameters by position, up to
    # MAX_ROWS_PER_INSERT rows a statement) and PostgreSQL (by name, ROWS_PER_INSERT rows): each
    # value must land in its own row and column.
    engine = make_engine(database_url)
    upgrade(engine)
    trail = AuditTrail(engine, flush_interval=SLOW_FLUSH, batch_size=2 * MAX_ROWS_PER_INSERT)
    count = MAX_ROWS_PER_INSERT + 2 * ROWS_PER_INSERT + 7
    events = [
        AuditEvent(
            at=1_700_000_000.0 + n,
            decision=GRANTED if n % 2 else DENIED,
            error=None if n % 2 else "invalid_target",
            reason=f"reason-{n}",
            client_id=f"client-{n}",
            subject=f"user-{n}" if n % 3 else "üser-ñ",
            subject_issuer=f"https://idp-{n}.example",
            subject_token_sha256=f"{n:016x}",
            actor=None if n % 5 else f"actor-{n}",
            audiences=[f"https://up-{n}.example", "https://shared.example"],
            scope=f"s{n}.read",
            jti=f"jti-{n}",
            expires_at=1_700_000_120.0 + n if n % 2 else None,
            kid=f"kid-{n % 4}",
        )
        for n in range(count)
    ]
    try:
        for item in events:
            trail.record(item)
        assert flushed(trail)
        rows = stored_audit_rows(engine)
    finally:
        trail.close(timeout=5)
        engine.dispose()

    assert len(rows) == count
    for row, item in zip(rows, events, strict=True):
        assert stored_values(row) == {name: getattr(item, name) for name in FIELDS}


def test_long_values_are_cut_to_the_column_size_instead_of_failing_the_batch(
    db: AuditDatabase,
) -> None:
    trail = db.trail(flush_interval=0.01)
    long = "s" * 1000

    trail.record(audit_event(long, reason="r" * 300, actor="a" * 256, client_id="c" * 400))
    trail.record(audit_event("after"))

    assert trail.flush()
    row, after = db.rows()
    assert row.subject == "s" * 255
    assert row.reason == "r" * 255
    assert row.actor == "a" * 255
    assert row.client_id == "c" * 255
    assert after.subject == "after"
    assert trail.healthy
