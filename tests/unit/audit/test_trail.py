"""The audit trail's queue and background writer (sidecar/audit.py), against a real SQLite file.

The database fails for real: its file is moved away and a directory takes its path, so SQLite
cannot open it, and it is put back later. Events are read back with SQLAlchemy; timing-dependent
steps poll with short deadlines instead of sleeping."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest

from sidecar.audit import (
    BACKPRESSURE_WAIT,
    GRANTED,
    MAX_TEXT,
    AuditEvent,
    AuditTrail,
)
from sidecar.audit import log as auditlog
from sidecar.audit.log import AUDIT_LOGGER
from sidecar.errors import TemporarilyUnavailableError
from sidecar.serving.common import LOG_FORMAT
from tests.loopback import wait_for
from tests.unit.support import (
    EVENT_FIELDS,
    SLOW_FLUSH,
    AuditDatabase,
    audit_event,
    flushed,
    grant_event,
)


@pytest.fixture
def audit_log(caplog: pytest.LogCaptureFixture) -> Callable[[], list[dict[str, Any]]]:
    """The ``exchange {json}`` lines of the sidecar.audit log so far, parsed."""
    caplog.set_level(logging.INFO, logger="sidecar.audit")

    def lines() -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for record in caplog.records:
            message = record.getMessage()
            if record.name == "sidecar.audit" and message.startswith("exchange "):
                found.append(json.loads(message.removeprefix("exchange ")))
        return found

    return lines


def writer_started(trail: AuditTrail) -> None:
    """Start the writer with one event ("warm-up"), written, and let it go back to waiting for
    work: a flush() or close() that follows wakes it at once."""
    trail.record(audit_event("warm-up"))
    assert flushed(trail)
    time.sleep(0.02)


# --- writing ------------------------------------------------------------------------------------


def test_events_are_written_in_order_with_every_field(db: AuditDatabase) -> None:
    trail = db.trail(flush_interval=0.01)
    grant = grant_event(
        request_id="0f3c9a",
        latency_ms=1.25,
        policies="gateway -> https://code-search.internal/mcp@1",
    )
    denial = AuditEvent(
        at=1_700_000_001.5,
        error="invalid_target",
        reason="no policy for this audience",
        client_id="gateway",
        subject="bob@example.com",
    )

    trail.record(grant)
    trail.record(denial)

    assert trail.flush()
    assert trail.pending == 0
    first, second = db.rows()
    assert first.id < second.id
    written = {name: getattr(first, name) for name in EVENT_FIELDS - {"audiences"}}
    assert written == {name: getattr(grant, name) for name in EVENT_FIELDS - {"audiences"}}
    assert first.decision == "granted"
    assert json.loads(first.audiences or "") == grant.audiences
    assert (second.decision, second.error, second.reason) == (
        "denied",
        "invalid_target",
        "no policy for this audience",
    )
    assert json.loads(second.audiences or "") == []  # JSON, even when empty
    assert second.jti is None
    assert second.expires_at is None


def test_events_are_written_in_batches_all_of_them_in_order(db: AuditDatabase) -> None:
    trail = db.trail(flush_interval=0.01, batch_size=3)
    subjects = [f"user-{n}" for n in range(10)]

    for subject in subjects:
        trail.record(audit_event(subject))

    assert trail.flush()
    assert db.subjects() == subjects
    assert trail.pending == 0
    assert trail.dropped == 0


def test_a_full_batch_is_written_without_waiting_for_the_interval(db: AuditDatabase) -> None:
    trail = db.trail(flush_interval=SLOW_FLUSH, batch_size=3)

    for n in range(3):
        trail.record(audit_event(f"user-{n}"))

    # Written by the writer on its own: no flush(), and the interval is a minute.
    assert wait_for(lambda: len(db.rows()) == 3, 5.0, interval=0.01)
    assert trail.pending == 0


def test_queued_events_wait_for_the_writer(db: AuditDatabase) -> None:
    trail = db.trail(flush_interval=SLOW_FLUSH, batch_size=100)

    trail.record(audit_event("queued"))

    assert trail.pending == 1
    assert db.rows() == []  # record() only queues: the request does not wait for the database
    assert flushed(trail)
    assert db.subjects() == ["queued"]


def test_each_event_has_one_log_line_with_only_its_fields(
    db: AuditDatabase, audit_log: Callable[[], list[dict[str, Any]]]
) -> None:
    trail = db.trail(flush_interval=0.01, batch_size=2)
    events = [
        audit_event("alice", GRANTED, audiences=["https://a.example"], jti="j-1", kid="k"),
        audit_event("bob", error="invalid_grant", reason="expired"),
        audit_event("carol", error="invalid_target", reason="no policy"),
    ]

    for each in events:
        trail.record(each)
    assert trail.flush()

    lines = audit_log()
    assert [line["subject"] for line in lines] == ["alice", "bob", "carol"]
    for line, each in zip(lines, events, strict=True):
        assert set(line) == EVENT_FIELDS  # no more than the event: nothing else leaks in
        assert line == {name: getattr(each, name) for name in EVENT_FIELDS}


class CountingStream(io.StringIO):
    """A text stream that counts its write() calls."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def batched_log() -> Iterator[CountingStream]:
    """The sidecar.audit logger routed to a stream through the batching handler, as `sidecar
    serve` sets it up (sidecar.serving.common.configure_logging), and restored afterwards."""
    logger = logging.getLogger(AUDIT_LOGGER)
    saved = (list(logger.handlers), logger.propagate, logger.level)
    stream = CountingStream()
    auditlog.install(stream, logging.Formatter(LOG_FORMAT))
    yield stream
    logger.handlers[:] = saved[0]
    logger.propagate, logger.level = saved[1], saved[2]


def batching_only() -> None:
    """Detach pytest's capture handlers, which pytest attaches to every non-propagating logger
    when a test starts (any other handler turns the batching off, rightly)."""
    logger = logging.getLogger(AUDIT_LOGGER)
    logger.handlers[:] = [h for h in logger.handlers if isinstance(h, auditlog.AuditLogHandler)]


def test_batched_log_lines_are_written_by_the_writer_in_one_write(
    db: AuditDatabase, batched_log: CountingStream
) -> None:
    batching_only()
    trail = db.trail(flush_interval=SLOW_FLUSH)
    subjects = [f"user-{n}" for n in range(5)]
    for subject in subjects:
        trail.record(audit_event(subject, GRANTED, jti=f"j-{subject}"))

    assert batched_log.getvalue() == ""  # the request only queued its line
    assert trail.flush()

    assert batched_log.writes == 1
    lines = batched_log.getvalue().splitlines()
    assert len(lines) == len(subjects)
    pattern = re.compile(
        rf"^\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} \[{os.getpid()}\] INFO "
        r"sidecar\.audit: exchange (\{.*\})$"
    )
    parsed = []
    for line in lines:
        match = pattern.match(line)
        assert match is not None, line
        parsed.append(json.loads(match.group(1)))
    assert [each["subject"] for each in parsed] == subjects
    assert all(set(each) == EVENT_FIELDS for each in parsed)
    assert db.subjects() == subjects


def test_batched_log_lines_queued_at_close_are_written(
    db: AuditDatabase, batched_log: CountingStream
) -> None:
    batching_only()
    trail = db.trail(flush_interval=SLOW_FLUSH)
    trail.record(audit_event("last"))
    trail.close()
    assert '"subject":"last"' in batched_log.getvalue()
    assert db.subjects() == ["last"]


def test_batched_log_lines_are_logged_while_the_database_refuses_writes(
    db: AuditDatabase, batched_log: CountingStream
) -> None:
    batching_only()
    trail = db.trail(flush_interval=0.01)
    trail.record(audit_event("before"))
    assert trail.flush()
    db.take_away()

    trail.record(audit_event("while-away", error="invalid_target", reason="no policy"))
    deadline = time.monotonic() + 5
    while '"subject":"while-away"' not in batched_log.getvalue():
        assert time.monotonic() < deadline, "the line was not logged"
        time.sleep(0.01)

    db.bring_back()
    assert flushed(trail)
    assert db.subjects() == ["before", "while-away"]
    assert batched_log.getvalue().count('"subject":"while-away"') == 1  # not again on retry


def test_beside_another_handler_each_event_is_logged_when_recorded(
    db: AuditDatabase, batched_log: CountingStream, audit_log: Callable[[], list[dict[str, Any]]]
) -> None:
    # pytest's capture handler sits beside the batching one: every handler gets every line,
    # through the logging module.
    assert auditlog.batch_handler(logging.getLogger(AUDIT_LOGGER)) is None
    trail = db.trail(flush_interval=SLOW_FLUSH)
    trail.record(audit_event("at-once"))
    assert [line["subject"] for line in audit_log()] == ["at-once"]
    assert '"subject":"at-once"' in batched_log.getvalue()


# --- the database fails -------------------------------------------------------------------------


def test_flush_is_false_while_the_database_refuses_writes(db: AuditDatabase) -> None:
    trail = db.trail(flush_interval=0.01)
    trail.record(audit_event("before"))
    assert trail.flush()

    db.take_away()
    trail.record(audit_event("during"))
    started = time.monotonic()

    assert trail.flush(timeout=5) is False
    assert time.monotonic() - started < 4  # it gives up once the writer failed, not at timeout
    assert trail.pending == 1
    assert not trail.healthy


def test_while_writes_fail_grants_are_refused_and_denials_queued(
    db: AuditDatabase, audit_log: Callable[[], list[dict[str, Any]]]
) -> None:
    trail = db.trail(flush_interval=0.01, batch_size=3, high_water=1)
    trail.record(audit_event("written", GRANTED))
    assert trail.flush()

    db.take_away()
    # Answered before the writer noticed (it tries the database only when it has events to
    # write): queued, and owed to the database.
    trail.record(audit_event("granted", GRANTED))
    assert wait_for(lambda: not trail.healthy, 5.0, interval=0.01)

    pending = trail.pending
    with pytest.raises(TemporarilyUnavailableError):
        trail.record(audit_event("refused", GRANTED))
    assert trail.pending == pending  # the refused grant queued nothing
    started = time.monotonic()
    for n in range(5):  # denials are still queued, and past high_water no request is held
        trail.record(audit_event(f"denied-{n}", error="invalid_grant"))
    assert time.monotonic() - started < BACKPRESSURE_WAIT
    assert trail.pending == pending + 5
    assert not trail.healthy

    db.bring_back()

    # The writer retries about once a second.
    assert wait_for(lambda: trail.healthy, 5.0, interval=0.01)
    assert trail.flush()
    queued = ["granted", *(f"denied-{n}" for n in range(5))]
    assert db.subjects() == ["written", *queued]  # each once, in order
    assert [line["subject"] for line in audit_log()] == ["written", *queued]  # retries: no
    trail.record(audit_event("granted-again", GRANTED))
    assert trail.flush()
    assert db.subjects()[-1] == "granted-again"


def test_max_pending_refuses_grants_and_only_logs_denials(
    db: AuditDatabase, audit_log: Callable[[], list[dict[str, Any]]]
) -> None:
    trail = db.trail(flush_interval=SLOW_FLUSH, batch_size=100, max_pending=3)
    writer_started(trail)
    for n in range(3):
        trail.record(audit_event(f"queued-{n}"))
    assert trail.pending == 3
    assert not trail.healthy

    with pytest.raises(TemporarilyUnavailableError):
        trail.record(audit_event("refused", GRANTED))
    trail.record(audit_event("dropped", error="invalid_grant"))

    assert trail.pending == 3
    assert trail.dropped == 1
    # Each event is logged when it is recorded, the dropped one too; the refused grant is not.
    logged = ["warm-up", "queued-0", "queued-1", "queued-2", "dropped"]
    assert [line["subject"] for line in audit_log()] == logged
    trail.close()
    assert db.subjects() == ["warm-up", "queued-0", "queued-1", "queued-2"]
    assert [line["subject"] for line in audit_log()] == logged  # once each


# --- shutdown -------------------------------------------------------------------------------------


def test_close_writes_everything_still_queued_and_is_idempotent(
    db: AuditDatabase, audit_log: Callable[[], list[dict[str, Any]]]
) -> None:
    trail = db.trail(flush_interval=SLOW_FLUSH, batch_size=4)
    writer_started(trail)
    subjects = [f"user-{n}" for n in range(7)]
    for subject in subjects[:3]:
        trail.record(audit_event(subject))
    assert trail.pending == 3
    for subject in subjects[3:]:  # fills one batch: the writer may start on it
        trail.record(audit_event(subject))

    trail.close(timeout=5)

    assert db.subjects() == ["warm-up", *subjects]
    assert trail.pending == 0
    assert trail.healthy
    trail.close(timeout=5)  # again (atexit and the worker_exit hook both call it): a no-op
    assert db.subjects() == ["warm-up", *subjects]
    assert [line["subject"] for line in audit_log()] == ["warm-up", *subjects]


def test_close_before_any_event_does_nothing(db: AuditDatabase) -> None:
    trail = db.trail()
    trail.close(timeout=1)
    trail.close(timeout=1)
    assert trail.pending == 0
    assert db.rows() == []


def test_close_while_the_database_is_away_leaves_every_event_in_the_log(
    db: AuditDatabase, audit_log: Callable[[], list[dict[str, Any]]]
) -> None:
    trail = db.trail(flush_interval=0.01, batch_size=2)
    trail.record(audit_event("written"))
    assert trail.flush()
    db.take_away()
    trail.record(audit_event("first"))
    assert wait_for(lambda: not trail.healthy, 5.0, interval=0.01)
    for n in range(4):
        trail.record(audit_event(f"denied-{n}"))

    trail.close(timeout=2)

    logged = [line["subject"] for line in audit_log()]
    assert trail.pending == 5  # not in the database: the database is gone
    assert logged == ["written", "first", *(f"denied-{n}" for n in range(4))]


# --- backpressure ---------------------------------------------------------------------------------


def test_past_high_water_record_waits_at_most_the_backpressure_wait(db: AuditDatabase) -> None:
    trail = db.trail(flush_interval=SLOW_FLUSH, batch_size=100, high_water=1)
    trail.record(audit_event("first"))
    # Another connection holds SQLite's write lock: the writer, woken by the second record, takes
    # both events and waits on the lock, so it cannot catch up while the request waits.
    blocker = sqlite3.connect(db.path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        trail.record(audit_event("second"))  # over high_water
        waited = time.monotonic() - started

        assert BACKPRESSURE_WAIT - 0.05 <= waited < BACKPRESSURE_WAIT + 0.5
        assert trail.pending == 2  # still to be written: the request went on, it was not refused
        assert trail.healthy
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert flushed(trail)
    assert db.subjects() == ["first", "second"]


def test_backpressure_ends_when_the_writer_catches_up(db: AuditDatabase) -> None:
    trail = db.trail(flush_interval=0.005, batch_size=100, high_water=1)
    started = time.monotonic()

    for n in range(20):
        trail.record(audit_event(f"user-{n}"))

    # Held back each time past high_water, but only until a batch is written, not the full wait.
    assert time.monotonic() - started < 20 * BACKPRESSURE_WAIT / 2
    assert trail.flush()
    assert len(db.rows()) == 20


# --- fork -----------------------------------------------------------------------------------------


def run_in_child(child: Callable[[], bool], timeout: float = 10.0) -> int:
    """Fork; the child runs ``child`` and exits 0 if it returned True, 1 if False, 2 if it raised.
    The child's exit status (-1: killed, still running after ``timeout``)."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 2
        try:
            status = 0 if child() else 1
        finally:
            os._exit(status)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return -1


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@needs_fork
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() of a multi-threaded process
def test_a_forked_child_starts_its_own_writer(db: AuditDatabase) -> None:
    trail = db.trail(flush_interval=SLOW_FLUSH, batch_size=100)
    writer_started(trail)  # and waiting, its lock released, when the process forks

    def child() -> bool:
        db.engine.dispose(close=False)  # the parent's pooled connections stay the parent's
        trail.record(audit_event("child"))
        return flushed(trail) and trail.healthy

    assert run_in_child(child) == 0
    trail.record(audit_event("parent-after"))
    assert flushed(trail)
    assert db.subjects() == ["warm-up", "child", "parent-after"]


@needs_fork
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_events_queued_before_a_fork_are_written_once(db: AuditDatabase) -> None:
    trail = db.trail(flush_interval=SLOW_FLUSH, batch_size=100)
    writer_started(trail)
    trail.record(audit_event("queued-at-fork"))

    def child() -> bool:
        db.engine.dispose(close=False)
        trail.record(audit_event("child"))
        return flushed(trail)

    assert run_in_child(child) == 0
    trail.close()
    assert sorted(str(s) for s in db.subjects()) == ["child", "queued-at-fork", "warm-up"]


def test_a_lone_surrogate_or_nul_in_a_claim_does_not_poison_the_writer(db: AuditDatabase) -> None:
    # Claim values come from IdPs: JSON admits a lone surrogate, PostgreSQL refuses a NUL.
    trail = db.trail()
    odd = AuditEvent(at=1.0, decision="granted", subject="bad\ud800", actor="nul\x00actor")
    trail.record(odd)
    trail.record(AuditEvent(at=2.0, decision="granted", subject="alice"))
    assert trail.flush(5)
    assert trail.healthy
    stored = [(row.subject, row.actor) for row in db.rows()]
    assert stored == [("bad?", "nul\ufffdactor"), ("alice", None)]
    trail.close()


# --- redaction on every path of the trail (its rules: test_redact.py) -----------------------------

JWT_KEY = "k" * 32  # HS256: a JWT of realistic shape without a key pair


def a_jwt(**claims: Any) -> str:
    payload = {"iss": "https://idp.test.example", "sub": "alice", "scope": "code.read", **claims}
    return jwt.encode(payload, JWT_KEY, algorithm="HS256")


def sha256_prefix(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def test_request_input_is_redacted_alike_in_the_row_and_the_log_line(
    db: AuditDatabase, audit_log: Callable[[], list[dict[str, Any]]]
) -> None:
    token = a_jwt()
    marker = "sha256:" + sha256_prefix(token)
    audiences = [token, "https://user:s3cret@host/x", "a" * 10_000, "https://host/ok"]
    trail = db.trail(flush_interval=0.01)
    denial = AuditEvent(
        at=1.0,
        error="invalid_scope",
        reason=f"scope not allowed by the policy: {token}",
        client_id="c" * 400,
        subject=token,
        actor="https://svc:s3cret@actor/",
        audiences=audiences,
        scope=f"code.read {token}",
    )
    trail.record(denial)
    assert trail.flush()

    [row] = db.rows()
    [line] = audit_log()
    stored = {name: getattr(row, name) for name in EVENT_FIELDS - {"audiences"}}
    stored["audiences"] = json.loads(row.audiences or "")
    assert stored == line  # the log line and the row hold the same text
    assert line["audiences"] == [marker, "https://host/x", "a" * MAX_TEXT, "https://host/ok"]
    assert line["reason"] == f"scope not allowed by the policy: {marker}"
    assert line["scope"] == f"code.read {marker}"
    assert (line["subject"], line["actor"]) == (marker, "https://actor/")
    assert line["client_id"] == "c" * MAX_TEXT
    text = json.dumps(line) + repr([getattr(row, name) for name in EVENT_FIELDS])
    assert token not in text
    assert token.split(".")[1] not in text  # not even the payload segment
    assert "s3cret" not in text
    assert denial.audiences is audiences  # the event is left alone
    assert audiences[0] == token


def test_many_audiences_are_bounded_in_number(db: AuditDatabase) -> None:
    trail = db.trail(flush_interval=0.01)
    trail.record(audit_event("alice", audiences=[f"https://a{n}.example" for n in range(100)]))
    assert trail.flush()
    [row] = db.rows()
    assert json.loads(row.audiences or "") == [f"https://a{n}.example" for n in range(16)]


def test_events_only_logged_are_redacted_too(
    db: AuditDatabase, audit_log: Callable[[], list[dict[str, Any]]]
) -> None:
    # A denial dropped while the queue is full, and one recorded after close(), go only to the
    # log: through the same redaction.
    token = a_jwt()
    marker = "sha256:" + sha256_prefix(token)
    trail = db.trail(flush_interval=SLOW_FLUSH, batch_size=100, max_pending=1)
    writer_started(trail)
    trail.record(audit_event("queued"))
    trail.record(audit_event("dropped", audiences=[token], reason=f"repeated parameter {token}"))
    assert trail.dropped == 1
    trail.close()
    trail.record(audit_event("after-close", audiences=["https://u:s3cret@host/x"], scope=token))

    lines = {line["subject"]: line for line in audit_log()}
    assert lines["dropped"]["audiences"] == [marker]
    assert lines["dropped"]["reason"] == f"repeated parameter {marker}"
    assert lines["after-close"]["audiences"] == ["https://host/x"]
    assert lines["after-close"]["scope"] == marker
    assert db.subjects() == ["warm-up", "queued"]


# --- retention ------------------------------------------------------------------------------------


def test_rows_past_the_retention_are_purged_by_the_writer(db: AuditDatabase) -> None:
    now = time.time()
    trail = db.trail(flush_interval=0.01, retention=3600.0, purge_interval=0.0)
    for index in range(5):
        trail.record(AuditEvent(at=now - 7200 - index, subject=f"old-{index}"))
    trail.record(AuditEvent(at=now - 60, subject="recent"))
    assert trail.flush()

    # The writer's next pass deletes what is older than the retention, nothing else.
    assert wait_for(lambda: db.subjects() == ["recent"], 5), db.subjects()


def test_without_a_retention_nothing_is_purged(db: AuditDatabase) -> None:
    trail = db.trail(flush_interval=0.01, purge_interval=0.0)
    trail.record(AuditEvent(at=1.0, subject="ancient"))
    assert trail.flush()
    time.sleep(0.1)  # several writer passes

    assert db.subjects() == ["ancient"]
