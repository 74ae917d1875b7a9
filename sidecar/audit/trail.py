"""The audit trail's writer: ``record`` queues, one thread per process writes batches."""

from __future__ import annotations

import atexit
import logging
import multiprocessing.util
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, delete, select

from sidecar.audit.event import GRANTED, AuditEvent
from sidecar.audit.log import batch_handler, log_event, log_line, write_lines
from sidecar.audit.redact import storable_values
from sidecar.audit.sql import (
    ROWS_PER_INSERT,
    Row,
    event_row,
    insert_rows,
    json_insert_sql,
    rows_per_insert,
)
from sidecar.errors import TemporarilyUnavailableError
from sidecar.store.models import AuditEventRow

log = logging.getLogger("sidecar.audit")

FLUSH_INTERVAL = 0.05  # seconds a queued event waits at most before its batch is written
BATCH_SIZE = 500
MAX_PENDING = 10_000
# Past this many queued events, a request waits (up to BACKPRESSURE_WAIT) for the writer to catch
# up before answering: overload becomes latency, not refusals, while the database keeps up.
HIGH_WATER = 2_000
BACKPRESSURE_WAIT = 0.5
PURGE_INTERVAL = 60.0  # seconds between two retention passes of one writer
PURGE_BATCH = 1000  # rows deleted by one statement
PURGE_BATCHES = 10  # statements per pass at most
RETRY_AFTER_FAILURE = 1.0  # seconds between write attempts while the database refuses them
_TRAILS: weakref.WeakSet[AuditTrail] = weakref.WeakSet()


PID = [os.getpid()]  # this process's id, kept at fork: os.getpid() is a system call


def _after_fork_in_child() -> None:
    PID[0] = os.getpid()
    for trail in list(_TRAILS):
        trail._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _ignore(*_: object) -> None:
    return None


class AuditTrail:
    def __init__(
        self,
        engine: Engine,
        *,
        flush_interval: float = FLUSH_INTERVAL,
        batch_size: int = BATCH_SIZE,
        max_pending: int = MAX_PENDING,
        high_water: int = HIGH_WATER,
        retention: float | None = None,
        purge_interval: float = PURGE_INTERVAL,
    ) -> None:
        self._engine = engine
        # audit.retention: rows older than this are deleted by the writer, a small batch at a
        # time, at most every purge_interval (None: kept for ever).
        self._retention = retention
        # Told of the queue's depth after each write pass and of each failed write: the metrics.
        self.observe_pending: Callable[[int], None] = _ignore
        self.observe_failure: Callable[[], None] = _ignore
        self._purge_interval = purge_interval
        self._purged_at = float("-inf")
        # On SQLite the request's JSON log line is its row (encoded on the request, a few
        # microseconds), so that the writer never holds the GIL to encode a whole batch
        # (1.4 ms for 500 rows).
        self._json_rows = json_insert_sql(engine.dialect) is not None
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
        if self._closed and self._pid == PID[0]:
            self._after_close(event)
            return
        if not self.healthy:
            if event.decision == GRANTED:
                raise TemporarilyUnavailableError(reason="audit trail unavailable")
            if self.pending >= self._max_pending:
                self.dropped += 1
                log_event(log_line(storable_values(event)))
                return
        self._ensure_writer()
        values = storable_values(event)
        line = log_line(values)
        # SQLite: the log line is the row too (one encoding); elsewhere the column tuple.
        row: Row | str = line if self._json_rows else event_row(values)
        batched = batch_handler(log) is not None
        with self._wake:
            closed = self._closed and self._pid == PID[0]  # close() ran meanwhile
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
            log_event(line)

    def _after_close(self, event: AuditEvent) -> None:
        # After close() (the process is exiting) nothing writes the queue any more: a grant is
        # refused, a denial is only logged.
        if event.decision == GRANTED:
            raise TemporarilyUnavailableError(reason="audit trail closed")
        log_event(log_line(storable_values(event)))

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
        if self._closed or self._pid != PID[0]:
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
            write_lines(lines)
        if self._queue or self._retry:
            # Not in the database, but every one of them is in the log (record() logged it).
            log.error(
                "audit trail closed with %d event(s) not written to the database (they are in "
                "the sidecar.audit log)",
                self.pending,
            )

    def _ensure_writer(self) -> None:
        if self._thread is not None and self._pid == PID[0]:
            return
        with self._wake:
            if self._thread is not None and self._pid == PID[0]:
                return
            # A forked child has the parent's queue but not its thread: it starts its own.
            self._pid = PID[0]
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
            written = self._write_pending()
            self.observe_pending(self.pending)
            if not written:
                time.sleep(RETRY_AFTER_FAILURE)
            elif self._retention is not None:
                self._purge_expired()

    def _purge_expired(self) -> None:
        """Delete rows past ``retention``: at most PURGE_BATCHES batches of PURGE_BATCH rows per
        pass, so that no transaction holds the table (or SQLite's write lock) for long; what is
        left goes at the next pass."""
        now = time.time()
        if now - self._purged_at < self._purge_interval:
            return
        self._purged_at = now
        assert self._retention is not None
        cutoff = now - self._retention
        oldest = (
            select(AuditEventRow.id)
            .where(AuditEventRow.at < cutoff)
            .order_by(AuditEventRow.id)
            .limit(PURGE_BATCH)
        )
        try:
            for _ in range(PURGE_BATCHES):
                with self._engine.begin() as connection:
                    deleted = connection.execute(
                        delete(AuditEventRow).where(AuditEventRow.id.in_(oldest))
                    ).rowcount
                if deleted < PURGE_BATCH:
                    break
        except Exception as exc:  # retried at the next pass; writing events matters more
            log.warning("audit retention purge failed: %s", type(exc).__name__)

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
            write_lines(lines)  # before the INSERT: the log never waits for the database
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
                        insert_rows(connection, rows[start : start + count])
                        start += count
            except Exception as exc:
                self.observe_failure()
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
