"""Writing audit rows: multi-row INSERTs compiled once per dialect and row count, and on SQLite
3.38+ one INSERT of a whole batch from one JSON text."""

from __future__ import annotations

import sqlite3
from functools import lru_cache
from itertools import chain
from typing import Any, cast

from sqlalchemy import Connection, Dialect, bindparam, insert

from sidecar.audit.event import FIELDS
from sidecar.audit.log import encode
from sidecar.audit.redact import MAX_TEXT, TRUNCATED
from sidecar.store.models import AuditEventRow

# Rows go to the database in multi-row INSERTs of up to this many rows: one statement (one
# round trip, and for SQLite one step outside the GIL) instead of one per row. 64 rows of 15
# columns stay under the 999 parameters of the oldest SQLite builds.
# As many rows as the 999 parameters of the oldest SQLite builds allow (58 rows of 17 columns).
ROWS_PER_INSERT = 999 // len(FIELDS)
MAX_ROWS_PER_INSERT = 1024  # SQLite 3.38+: a batch in one statement (see json_insert_sql)
Row = tuple[Any, ...]  # an event's columns, in FIELDS order
_AUDIENCES = FIELDS.index("audiences")  # stored as its JSON text
_CUT = tuple(FIELDS.index(name) for name in TRUNCATED)


@lru_cache(maxsize=32)
def insert_sql(
    dialect: Dialect, count: int
) -> tuple[str, tuple[tuple[str, int, int], ...], bool, bool]:
    """``INSERT INTO audit_events (...) VALUES (...), (...), ...`` for ``count`` rows, compiled
    once per database dialect and row count: the SQL text; each parameter (its name, its row,
    its column) in the order the SQL takes them; whether the driver takes them by position (a
    tuple) or by name (a dict); and whether that order is simply the rows one after the other."""
    statement = insert(AuditEventRow).values(
        [{name: bindparam(f"{name}_{row}") for name in FIELDS} for row in range(count)]
    )
    compiled = statement.compile(dialect=dialect)
    where = {
        f"{name}_{row}": (row, column) for row in range(count) for column, name in enumerate(FIELDS)
    }
    names = compiled.positiontup if compiled.positional else list(where)
    if names is None or sorted(names) != sorted(where):  # every parameter, exactly once
        raise RuntimeError(f"unexpected parameters in the compiled audit INSERT: {names}")
    parameters = tuple((key, *where[key]) for key in names)
    row_major = compiled.positional and list(names) == list(where)
    return str(compiled), parameters, compiled.positional, row_major


@lru_cache(maxsize=8)
def json_insert_sql(dialect: Dialect) -> str | None:
    """On SQLite 3.38+ (JSON built in): one INSERT for any number of rows, which come as one
    parameter, a JSON array of the events' JSON objects (their ``sidecar.audit`` log lines: one
    encoding per event serves both). Column sizes are enforced here (``substr``) as ``_row``
    does for other databases. None on other databases.

    Why: a batch must be one statement (one step outside the GIL, and SQLite's write lock, which
    the workers share, held only that long), and a multi-row ``VALUES`` text per row count would
    leave a prepared statement per batch size in the driver's statement cache (hundreds of
    kilobytes each, up to 128 of them: measured, worker RSS grew from 71 to 130 MiB)."""
    if dialect.name != "sqlite" or sqlite3.sqlite_version_info < (3, 38):
        return None
    sql, _, positional, row_major = insert_sql(dialect, 1)
    head, values, _ = sql.rpartition(" VALUES ")
    if not (positional and row_major and values):  # row_major: the columns in FIELDS order
        return None
    columns = []
    for name in FIELDS:
        # An array (audiences) comes back as its JSON text, escapes kept: what _row stores.
        column = f"json_extract(value, '$.{name}')"
        columns.append(f"substr({column}, 1, {MAX_TEXT})" if name in TRUNCATED else column)
    # Built from SQLAlchemy's own text and the field names: no input reaches it.
    return f"{head} SELECT {', '.join(columns)} FROM json_each(?) ORDER BY key"  # noqa: S608


def rows_per_insert(dialect: Dialect) -> int:
    """How many rows one INSERT takes: a whole batch on SQLite 3.38+, 64 elsewhere."""
    return MAX_ROWS_PER_INSERT if json_insert_sql(dialect) is not None else ROWS_PER_INSERT


def insert_rows(connection: Connection, rows: list[Row] | list[str]) -> None:
    """The rows in one multi-row INSERT, on the driver directly: on SQLite (see
    :func:`json_insert_sql`) the events' JSON texts, elsewhere their column tuples."""
    json_sql = json_insert_sql(connection.dialect)
    if json_sql is not None:
        # Exact: floats go through repr() and back, strings through JSON escapes (ASCII).
        connection.exec_driver_sql(json_sql, ("[" + ",".join(cast(list[str], rows)) + "]",))
        return
    tuples = cast(list[Row], rows)
    sql, parameters, positional, row_major = insert_sql(connection.dialect, len(tuples))
    if row_major:
        connection.exec_driver_sql(sql, tuple(chain.from_iterable(tuples)))
    elif positional:
        connection.exec_driver_sql(sql, tuple(tuples[row][column] for _, row, column in parameters))
    else:
        connection.exec_driver_sql(
            sql, {key: tuples[row][column] for key, row, column in parameters}
        )


def event_row(values: dict[str, Any]) -> Row:
    """The event's row (from storable values), its columns in ``FIELDS`` order."""
    row = list(values.values())
    row[_AUDIENCES] = encode(row[_AUDIENCES])  # ASCII: the encoder escapes the rest
    for column in _CUT:
        value = row[column]
        if value is not None and len(value) > MAX_TEXT:
            row[column] = value[:MAX_TEXT]
    return tuple(row)
