"""The audit trail: every exchange decision, granted or denied, with the reason.

Never a token or a secret: a subject token appears as a short SHA-256 prefix, a minted token as its
``jti``. Each event is written to the database and to the ``sidecar.audit`` log as one JSON line.

Off the hot path: ``record`` queues the event's row and its log line (both built there, a few
microseconds); one background thread per process writes the queue in batches (one transaction
each) every ``flush_interval`` or sooner when a batch fills, and hands the log lines queued since
its last batch to the ``sidecar.audit`` log's batching handler (:mod:`sidecar.auditlog`) in one
write. Without that handler, ``record`` logs the event itself, through the logging module. The
writer runs no per-event Python: the requests' threads (under the asyncio worker, the event
loop) and the writer share one GIL, and each time a request released it (an RS256
verification, an ES256 signature) a writer with Python left to run took it, so the request then
waited for it. Measured in-process on the uncached path, 10,000 exchanges: 380 us of CPU per
exchange with the rows and log lines built by the writer, against 187 us with no audit at all.
Nothing is lost on a graceful shutdown: ``close`` (called when a gunicorn worker exits, and at
interpreter exit) writes what is queued. Fail closed: while the database refuses writes, or while
``max_pending`` events wait, a *grant* is refused with 503 instead of answered unrecorded; the
queued events are retried until they are written.

Nothing a client sends is kept verbatim beyond a short bound: a subject token pasted into
``audience`` or ``scope`` by mistake, or a password in a ``resource`` URI's userinfo, would
otherwise sit in the log and the table for as long as they are kept, readable by everyone who
may read the audit trail. :func:`redact_value` (and :func:`redact_words` for the space-separated
scope and reason) runs once per event in :func:`_make_storable`, which both the log line and the
row come from, so the two always hold the same, redacted text.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import multiprocessing.util
import os
import re
import sqlite3
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import lru_cache
from itertools import chain
from typing import Any, cast

from sqlalchemy import Connection, Dialect, Engine, bindparam, insert

from sidecar.auditlog import batch_handler
from sidecar.errors import TemporarilyUnavailableError
from sidecar.store.models import AuditEventRow

log = logging.getLogger("sidecar.audit")

GRANTED, DENIED = "granted", "denied"
FLUSH_INTERVAL = 0.05  # seconds a queued event waits at most before its batch is written
BATCH_SIZE = 500
MAX_PENDING = 10_000
# Past this many queued events, a request waits (up to BACKPRESSURE_WAIT) for the writer to catch
# up before answering: overload becomes latency, not refusals, while the database keeps up.
HIGH_WATER = 2_000
BACKPRESSURE_WAIT = 0.5
RETRY_AFTER_FAILURE = 1.0  # seconds between write attempts while the database refuses them
# Column limits: a long `sub` from an IdP must not turn a batch into a failed insert.
_TRUNCATED = ("reason", "subject", "actor", "client_id")
MAX_TEXT = 255  # also the bound of each value from a request (an audience, a scope token)
MAX_SCOPE_TEXT = 1024  # the whole scope string (a Text column: the bound is ours)
MAX_AUDIENCES = 16  # the request parser allows 8 targets; the audit keeps its own bound
# Rows go to the database in multi-row INSERTs of up to this many rows: one statement (one
# round trip, and for SQLite one step outside the GIL) instead of one per row. 64 rows of 15
# columns stay under the 999 parameters of the oldest SQLite builds.
ROWS_PER_INSERT = 64
MAX_ROWS_PER_INSERT = 1024  # SQLite 3.38+: a batch in one statement (see _json_insert_sql)
_TRAILS: weakref.WeakSet[AuditTrail] = weakref.WeakSet()


_PID = [os.getpid()]  # this process's id, kept at fork: os.getpid() is a system call


def _after_fork_in_child() -> None:
    _PID[0] = os.getpid()
    for trail in list(_TRAILS):
        trail._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass(slots=True)
class AuditEvent:
    """Filled in as an exchange progresses, so a denial records how far the request got."""

    at: float
    decision: str = DENIED
    error: str | None = None
    reason: str | None = None
    client_id: str | None = None
    subject: str | None = None
    subject_issuer: str | None = None
    subject_token_sha256: str | None = None
    actor: str | None = None
    audiences: list[str] = field(default_factory=list)
    scope: str | None = None
    jti: str | None = None
    expires_at: float | None = None
    kid: str | None = None


_FIELDS = tuple(f.name for f in fields(AuditEvent))
Row = tuple[Any, ...]  # an event's columns, in _FIELDS order


@lru_cache(maxsize=32)
def _insert_sql(
    dialect: Dialect, count: int
) -> tuple[str, tuple[tuple[str, int, int], ...], bool, bool]:
    """``INSERT INTO audit_events (...) VALUES (...), (...), ...`` for ``count`` rows, compiled
    once per database dialect and row count: the SQL text; each parameter (its name, its row,
    its column) in the order the SQL takes them; whether the driver takes them by position (a
    tuple) or by name (a dict); and whether that order is simply the rows one after the other."""
    statement = insert(AuditEventRow).values(
        [{name: bindparam(f"{name}_{row}") for name in _FIELDS} for row in range(count)]
    )
    compiled = statement.compile(dialect=dialect)
    where = {
        f"{name}_{row}": (row, column)
        for row in range(count)
        for column, name in enumerate(_FIELDS)
    }
    names = compiled.positiontup if compiled.positional else list(where)
    if names is None or sorted(names) != sorted(where):  # every parameter, exactly once
        raise RuntimeError(f"unexpected parameters in the compiled audit INSERT: {names}")
    parameters = tuple((key, *where[key]) for key in names)
    row_major = compiled.positional and list(names) == list(where)
    return str(compiled), parameters, compiled.positional, row_major


@lru_cache(maxsize=8)
def _json_insert_sql(dialect: Dialect) -> str | None:
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
    sql, _, positional, row_major = _insert_sql(dialect, 1)
    head, values, _ = sql.rpartition(" VALUES ")
    if not (positional and row_major and values):  # row_major: the columns in _FIELDS order
        return None
    columns = []
    for name in _FIELDS:
        # An array (audiences) comes back as its JSON text, escapes kept: what _row stores.
        column = f"json_extract(value, '$.{name}')"
        columns.append(f"substr({column}, 1, {MAX_TEXT})" if name in _TRUNCATED else column)
    # Built from SQLAlchemy's own text and the field names: no input reaches it.
    return f"{head} SELECT {', '.join(columns)} FROM json_each(?) ORDER BY key"  # noqa: S608


def rows_per_insert(dialect: Dialect) -> int:
    """How many rows one INSERT takes: a whole batch on SQLite 3.38+, 64 elsewhere."""
    return MAX_ROWS_PER_INSERT if _json_insert_sql(dialect) is not None else ROWS_PER_INSERT


def _insert(connection: Connection, rows: list[Row] | list[str]) -> None:
    """The rows in one multi-row INSERT, on the driver directly: on SQLite (see
    :func:`_json_insert_sql`) the events' JSON texts, elsewhere their column tuples."""
    json_sql = _json_insert_sql(connection.dialect)
    if json_sql is not None:
        # Exact: floats go through repr() and back, strings through JSON escapes (ASCII).
        connection.exec_driver_sql(json_sql, ("[" + ",".join(cast(list[str], rows)) + "]",))
        return
    tuples = cast(list[Row], rows)
    sql, parameters, positional, row_major = _insert_sql(connection.dialect, len(tuples))
    if row_major:
        connection.exec_driver_sql(sql, tuple(chain.from_iterable(tuples)))
    elif positional:
        connection.exec_driver_sql(sql, tuple(tuples[row][column] for _, row, column in parameters))
    else:
        connection.exec_driver_sql(
            sql, {key: tuples[row][column] for key, row, column in parameters}
        )


_encode = json.JSONEncoder(separators=(",", ":")).encode  # built once, not per event


def _values(event: AuditEvent) -> dict[str, Any]:
    return {name: getattr(event, name) for name in _FIELDS}


def _log_line(values: dict[str, Any]) -> str:
    return _encode(values)


def _log_event(line: str) -> None:
    """``log.info("exchange %s", line)``, without the caller lookup (a stack walk per event that
    no format of ours shows); the record goes through the logger's level, filters and handlers."""
    if log.isEnabledFor(logging.INFO):
        log.handle(
            log.makeRecord(log.name, logging.INFO, __file__, 0, "exchange %s", (line,), None)
        )


def _write_lines(lines: list[str]) -> None:
    """Queued log lines in one write; one by one through the logging module when the batching
    handler was removed since they were queued."""
    if not lines:
        return
    handler = batch_handler(log)
    if handler is not None:
        handler.write_lines(lines)
    else:
        for line in lines:
            _log_event(line)


def _storable(text: str) -> str:
    """A string every database stores: claim values come from IdPs, and a lone surrogate (which
    JSON admits) or a NUL (which PostgreSQL refuses) must not make a batch fail for ever."""
    if text.isascii() and "\x00" not in text:
        return text
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")


# Three to five base64url segments: a JWS (3) or JWE (5) compact serialization.
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]{2,}(?:\.[A-Za-z0-9_-]*){2,4}")
# One inside a longer value ("https://host/x?token=eyJ...", "Bearer eyJ..."): a JOSE header is
# a JSON object, so its base64url begins "eyJ" ('{"').
_EMBEDDED_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){2,4}")
_JSON_START = ("ey", "ew")  # base64url of '{' followed by '"', ' ' or a line break / tab
_MIN_HEADER = 15  # characters of the shortest JOSE header, {"alg":"x"}, in base64url
_MAX_LABEL = 63  # a DNS label: a longer dot-separated segment is no host name
_PLAIN = _MAX_LABEL + 2  # no value this short or shorter is a JWT unless it starts "ey"/"ew"


def fingerprint(text: str) -> str:
    """What stands for a token in the audit trail: the short SHA-256 prefix of
    ``subject_token_sha256``, marked as such."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return "sha256:" + digest[:16]


def _looks_like_jwt(text: str) -> bool:
    # Three dotted segments alone would also match every host name ("api.example.com"), which
    # the audit must keep readable: a JWT is told apart by its JSON header or its length.
    if text.startswith("eyJ"):
        return True
    json_start = text.startswith(_JSON_START)
    if not json_start and len(text) <= _PLAIN:
        return False
    if text.count(".") < 2 or _JWT_SHAPE.fullmatch(text) is None:
        return False
    segments = text.split(".")
    if json_start and len(segments[0]) >= _MIN_HEADER:
        return True
    return max(len(segment) for segment in segments) > _MAX_LABEL


def _drop_userinfo(text: str) -> str:
    """Every ``//userinfo@`` cut out, found by hand rather than by a URI parser, which refuses
    (or reads differently) the malformed values an attacker sends. The authority ends at the
    first ``/``, ``?`` or ``#`` (RFC 3986 §3.2); a backslash does not end it here, so that text
    a browser would read as a password is dropped too."""
    start = text.find("//")
    while start != -1:
        start += 2
        end = len(text)
        for stop in "/?#":
            found = text.find(stop, start, end)
            if found != -1:
                end = found
        at = text.rfind("@", start, end)
        if at != -1:
            text = text[:start] + text[at + 1 :]
            end = start + (end - at - 1)
        start = text.find("//", end)
    return text


def redact_value(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` as the audit may keep it: a JWT as its :func:`fingerprint` (also one inside the
    value), a URI without its userinfo, at most ``limit`` characters. Never raises."""
    if (
        len(text) <= _PLAIN
        and len(text) <= limit
        and ("@" not in text or "//" not in text)
        and "eyJ" not in text
        and not text.startswith(_JSON_START)
    ):
        return text  # the common case: a host name, a URI, an e-mail address, a scope token
    if _looks_like_jwt(text):
        return fingerprint(text)[:limit]
    if "@" in text:
        text = _drop_userinfo(text)
    if "eyJ" in text:
        text = _EMBEDDED_JWT.sub(lambda match: fingerprint(match[0]), text)
    return text[:limit]


def redact_words(text: str, limit: int = MAX_TEXT) -> str:
    """A space-separated text (a scope, a reason that quotes requested scopes or a parameter's
    name) with each word as :func:`redact_value` keeps it, at most ``limit`` characters."""
    if (
        len(text) <= _PLAIN
        and len(text) <= limit
        and ("@" not in text or "//" not in text)
        and " ey" not in text
        and " ew" not in text
        and not text.startswith(_JSON_START)
    ):
        return text  # no word in it can be a JWT or carry userinfo
    return " ".join([redact_value(word) for word in text.split(" ")])[:limit]


def _redact_audiences(audiences: list[str]) -> list[str]:
    """The audiences redacted, in a new list (the event's own is left as it is); the same list
    when none needs it, the usual case."""
    if len(audiences) <= MAX_AUDIENCES:
        for audience in audiences:
            if len(audience) > _PLAIN or "ey" in audience or "ew" in audience or "@" in audience:
                break
        else:
            return audiences
    return [redact_value(audience) for audience in audiences[:MAX_AUDIENCES]]


_AUDIENCES = _FIELDS.index("audiences")  # stored as its JSON text
# Fields holding a str or None, and the columns cut to their size.
_TEXT = tuple(name for name in _FIELDS if name not in ("at", "expires_at", "audiences"))
_CUT = tuple(_FIELDS.index(name) for name in _TRUNCATED)
# Fields that may hold what a client sent, and how each is redacted. audiences: the request's
# targets, recorded before any check. reason: quotes the requested scope tokens a policy refused
# and the name of a repeated form parameter. scope (only on a grant, within what the policy
# allows), client_id (only once authenticated), subject and actor (only from a verified token):
# bounded all the same, since a client's or an IdP's values are no more trusted for the audit.
# The other fields are the sidecar's own (error, jti, kid, the fingerprint) or a configured
# trusted issuer (subject_issuer).
_REDACTED: tuple[tuple[str, Callable[[str], str]], ...] = (
    ("reason", redact_words),
    ("client_id", redact_value),
    ("subject", redact_value),
    ("actor", redact_value),
    ("scope", lambda text: redact_words(text, MAX_SCOPE_TEXT)),
)


def _make_storable(values: dict[str, Any]) -> dict[str, Any]:
    """The event's values (in place) with what came from the request redacted, and every text
    as any database stores it: the log line and the row then hold the same text."""
    for name in _TEXT:
        value = values[name]
        if value is not None and (not value.isascii() or "\x00" in value):
            values[name] = _storable(value)
    for name, redact in _REDACTED:
        value = values[name]
        # (The checks of redact_value's first line, loosened: no call for the usual values.)
        if value is not None and (
            len(value) > _PLAIN or "ey" in value or "ew" in value or "@" in value
        ):
            values[name] = redact(value)
    if values["audiences"]:
        values["audiences"] = _redact_audiences(values["audiences"])
    return values


def _storable_values(event: AuditEvent) -> dict[str, Any]:
    return _make_storable(_values(event))


def _row(values: dict[str, Any]) -> Row:
    """The event's row (from storable values), its columns in ``_FIELDS`` order."""
    row = list(values.values())
    row[_AUDIENCES] = _encode(row[_AUDIENCES])  # ASCII: the encoder escapes the rest
    for column in _CUT:
        value = row[column]
        if value is not None and len(value) > MAX_TEXT:
            row[column] = value[:MAX_TEXT]
    return tuple(row)


class AuditTrail:
    def __init__(
        self,
        engine: Engine,
        *,
        flush_interval: float = FLUSH_INTERVAL,
        batch_size: int = BATCH_SIZE,
        max_pending: int = MAX_PENDING,
        high_water: int = HIGH_WATER,
    ) -> None:
        self._engine = engine
        # On SQLite the request's JSON log line is its row (encoded on the request, a few
        # microseconds), so that the writer never holds the GIL to encode a whole batch
        # (1.4 ms for 500 rows).
        self._json_rows = _json_insert_sql(engine.dialect) is not None
        self._flush_interval = flush_interval
        self._batch_size = batch_size
        self._max_pending = max_pending
        self._high_water = high_water
        self._reset()
        _TRAILS.add(self)

    def _reset(self) -> None:
        """A fresh, empty trail with no writer: at construction, and in a forked child (whose
        copy of the parent's queue is the parent's to write, and whose locks may have been
        copied while held)."""
        self._queue: deque[Any] = deque()  # rows: JSON texts (SQLite) or column tuples
        self._retry: list[Any] = []  # rows not yet in the database
        self._lines: list[str] = []  # log lines for the batching handler, not yet written
        lock = threading.Lock()
        self._wake = threading.Condition(lock)  # the writer waits for events or close()
        self._idle = threading.Condition(lock)  # flush() waits for the writer to catch up
        self._writing = False
        self._in_flight = 0  # events taken off the queue by a write not yet committed
        self._failing = False
        self._flush_requested = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._pid = 0
        self.dropped = 0  # denials recorded in the log only, because the queue was full

    @property
    def healthy(self) -> bool:
        """False while the database refuses writes or the queue is full (grants are refused)."""
        return not self._failing and self.pending < self._max_pending

    @property
    def pending(self) -> int:
        """Events not yet in the database: queued, being written, or waiting for a retry."""
        return len(self._queue) + len(self._retry) + self._in_flight

    def record(self, event: AuditEvent) -> None:
        """Queue the event; raises TemporarilyUnavailableError, queueing nothing, for a *grant*
        that could not be recorded. A denial is always at least logged."""
        if self._closed and self._pid == _PID[0]:
            self._after_close(event)
            return
        if not self.healthy:
            if event.decision == GRANTED:
                raise TemporarilyUnavailableError(reason="audit trail unavailable")
            if self.pending >= self._max_pending:
                self.dropped += 1
                _log_event(_log_line(_storable_values(event)))
                return
        self._ensure_writer()
        values = _storable_values(event)
        line = _log_line(values)
        # SQLite: the log line is the row too (one encoding); elsewhere the column tuple.
        row: Row | str = line if self._json_rows else _row(values)
        batched = batch_handler(log) is not None
        with self._wake:
            closed = self._closed and self._pid == _PID[0]  # close() ran meanwhile
            if not closed:
                self._queue.append(row)
                if batched:
                    self._lines.append(line)
                if len(self._queue) >= self._batch_size:
                    self._wake.notify()
                if len(self._queue) > self._high_water and not self._failing:
                    self._wake.notify()
                    self._idle.wait(BACKPRESSURE_WAIT)
        if closed:
            self._after_close(event)
        elif not batched:
            _log_event(line)

    def _after_close(self, event: AuditEvent) -> None:
        # After close() (the process is exiting) nothing writes the queue any more: a grant is
        # refused, a denial is only logged.
        if event.decision == GRANTED:
            raise TemporarilyUnavailableError(reason="audit trail closed")
        _log_event(_log_line(_storable_values(event)))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every event queued so far is written; False if that took over ``timeout``
        (the database refusing writes, say)."""
        deadline = time.monotonic() + timeout
        with self._wake:
            self._flush_requested = True
            self._wake.notify()
            while self._queue or self._retry or self._writing:
                if self._thread is None or not self._thread.is_alive() or self._failing:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(min(remaining, 0.1))
        return not (self._queue or self._retry)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued and stop the writer (a graceful shutdown loses nothing)."""
        if self._closed or self._pid != _PID[0]:
            return
        self.flush(timeout)
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        writer_stopped = self._thread is None or not self._thread.is_alive()
        if writer_stopped and (self._queue or self._retry):  # one last attempt, here
            self._write_pending()
        if writer_stopped:
            with self._wake:
                lines, self._lines = self._lines, []
            _write_lines(lines)
        if self._queue or self._retry:
            # Not in the database, but every one of them is in the log (record() logged it).
            log.error(
                "audit trail closed with %d event(s) not written to the database (they are in "
                "the sidecar.audit log)",
                self.pending,
            )

    def _ensure_writer(self) -> None:
        if self._thread is not None and self._pid == _PID[0]:
            return
        with self._wake:
            if self._thread is not None and self._pid == _PID[0]:
                return
            # A forked child has the parent's queue but not its thread: it starts its own.
            self._pid = _PID[0]
            self._closed = False
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()
            atexit.register(self.close)
            # A multiprocessing child (a granian worker) ends with os._exit, skipping atexit; its
            # exit runs multiprocessing's finalizers instead.
            multiprocessing.util.Finalize(None, self.close, exitpriority=100)

    def _run(self) -> None:
        while True:
            with self._wake:
                if (
                    not self._closed
                    and not self._flush_requested
                    and len(self._queue) < self._batch_size
                ):
                    self._wake.wait(self._flush_interval)
                self._flush_requested = False
                if self._closed and not (self._queue or self._retry):
                    return
                if self._closed and self._failing:
                    return  # close() reports what is left
            if not self._write_pending():
                time.sleep(RETRY_AFTER_FAILURE)

    def _write_pending(self) -> bool:
        """Write the retried rows and the queue, a batch at a time; False on a failed write."""
        while True:
            with self._wake:
                taken = [
                    self._queue.popleft()
                    for _ in range(min(self._batch_size - len(self._retry), len(self._queue)))
                ]
                if not (taken or self._retry):
                    self._idle.notify_all()
                    return True
                self._writing = True
                rows, self._retry = self._retry, []
                self._in_flight = len(rows) + len(taken)
                lines, self._lines = self._lines, []
            _write_lines(lines)  # before the INSERT: the log never waits for the database
            rows += taken
            try:
                with self._engine.begin() as connection:
                    most = rows_per_insert(connection.dialect)
                    start = 0
                    while start < len(rows):
                        # SQLite: the whole batch at once. Elsewhere 64 rows at a time, the
                        # rest in 32, 16, ...: a few statements to build and keep (each an SQL
                        # text of up to 64 rows), not one per row count.
                        count = len(rows) - start
                        if count > most or most == ROWS_PER_INSERT:
                            count = min(most, 1 << (count.bit_length() - 1))
                        _insert(connection, rows[start : start + count])
                        start += count
            except Exception as exc:
                with self._wake:
                    self._retry = rows + self._retry
                    self._writing = False
                    self._in_flight = 0
                    if not self._failing:
                        log.error(
                            "audit records not written (%s): grants are refused until the "
                            "database accepts them again",
                            type(exc).__name__,
                        )
                    self._failing = True
                    self._idle.notify_all()
                return False
            with self._wake:
                self._writing = False
                self._in_flight = 0
                if self._failing:
                    log.warning("audit records written again")
                self._failing = False
                self._idle.notify_all()  # requests held back by HIGH_WATER may go on
