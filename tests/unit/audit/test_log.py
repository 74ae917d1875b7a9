"""The ``sidecar.audit`` log (sidecar/audit/log.py): with the batching handler installed, the
lines queued since the last batch go out in one write, each after the service's log prefix;
without it, each line is an ordinary record through the logging module."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from sidecar.audit import FIELDS, GRANTED, AuditEvent
from sidecar.audit import log as auditlog
from sidecar.audit.log import (
    AUDIT_LOGGER,
    AuditLogHandler,
    batch_handler,
    event_values,
    install,
    log_event,
    log_line,
    write_lines,
)

PREFIX_FORMAT = "%(levelname)s %(name)s: %(message)s"
LINES = ['{"subject":"alice"}', '{"subject":"bob"}', '{"subject":"carol"}']


class CountingStream(io.StringIO):
    """A text stream that counts its write() calls."""

    writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


class BrokenStream(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError("disk full")


@pytest.fixture
def audit_logger() -> Iterator[logging.Logger]:
    """The ``sidecar.audit`` logger, with no handler of its own during the test and restored
    afterwards (handlers, filters, level, propagation)."""
    logger = logging.getLogger(AUDIT_LOGGER)
    saved = (list(logger.handlers), list(logger.filters), logger.propagate, logger.level)
    logger.handlers[:] = []
    yield logger
    logger.handlers[:], logger.filters[:] = saved[0], saved[1]
    logger.propagate, logger.level = saved[2], saved[3]


@pytest.fixture
def stream(audit_logger: logging.Logger) -> CountingStream:
    """The logger routed to a counting stream through the batching handler, and nothing else."""
    stream = CountingStream()
    install(stream, logging.Formatter(PREFIX_FORMAT))
    return stream


def batching_only() -> None:
    """Detach pytest's capture handlers, which pytest attaches to every non-propagating logger
    when a test starts (any other handler turns the batching off, rightly)."""
    logger = logging.getLogger(AUDIT_LOGGER)
    logger.handlers[:] = [h for h in logger.handlers if isinstance(h, AuditLogHandler)]


# --- the batching handler -------------------------------------------------------------------------


def test_the_handler_writes_every_line_in_one_write_after_the_prefix() -> None:
    stream = CountingStream()
    handler = AuditLogHandler(stream)
    handler.setFormatter(logging.Formatter(PREFIX_FORMAT))

    handler.write_lines(LINES)

    assert stream.writes == 1
    assert stream.getvalue() == "".join(f"INFO sidecar.audit: exchange {line}\n" for line in LINES)


def test_the_handler_writes_nothing_for_no_lines() -> None:
    stream = CountingStream()
    AuditLogHandler(stream).write_lines([])
    assert stream.writes == 0


def test_a_failing_stream_is_reported_by_logging_not_raised(
    capsys: pytest.CaptureFixture[str],
) -> None:
    handler = AuditLogHandler(BrokenStream())

    handler.write_lines(LINES)  # the writer thread must survive a full disk

    assert "Logging error" in capsys.readouterr().err


def test_install_routes_the_logger_to_one_batching_handler_only(
    audit_logger: logging.Logger,
) -> None:
    audit_logger.setLevel(logging.WARNING)
    first = install(io.StringIO(), logging.Formatter(PREFIX_FORMAT))
    second = install(io.StringIO(), logging.Formatter(PREFIX_FORMAT))

    assert audit_logger.handlers == [second]  # installed again: the first one is replaced
    assert first is not second
    assert audit_logger.propagate is False  # the root's handlers would write each line twice
    assert audit_logger.level == logging.INFO


# --- when the batching handler is used ------------------------------------------------------------


def test_the_batching_handler_is_used_when_it_is_the_only_way_out(
    audit_logger: logging.Logger, stream: CountingStream
) -> None:
    batching_only()
    assert batch_handler(audit_logger) is audit_logger.handlers[0]


def test_another_handler_beside_it_turns_batching_off(
    audit_logger: logging.Logger, stream: CountingStream
) -> None:
    batching_only()
    audit_logger.addHandler(logging.StreamHandler(io.StringIO()))
    assert batch_handler(audit_logger) is None


def test_propagation_to_the_root_logger_turns_batching_off(
    audit_logger: logging.Logger, stream: CountingStream
) -> None:
    batching_only()
    audit_logger.propagate = True
    assert batch_handler(audit_logger) is None


def test_a_filter_on_the_logger_turns_batching_off(
    audit_logger: logging.Logger, stream: CountingStream
) -> None:
    batching_only()
    audit_logger.addFilter(lambda record: True)
    assert batch_handler(audit_logger) is None


def test_info_disabled_turns_batching_off(
    audit_logger: logging.Logger, stream: CountingStream
) -> None:
    batching_only()
    audit_logger.setLevel(logging.WARNING)
    assert batch_handler(audit_logger) is None


def test_a_subclass_of_the_handler_is_not_taken_for_it(audit_logger: logging.Logger) -> None:
    class Other(AuditLogHandler):
        pass

    audit_logger.addHandler(Other(io.StringIO()))
    audit_logger.propagate = False
    audit_logger.setLevel(logging.INFO)
    batching_only()
    assert batch_handler(audit_logger) is None


def test_no_handler_at_all_is_no_batching(audit_logger: logging.Logger) -> None:
    audit_logger.propagate = False
    audit_logger.setLevel(logging.INFO)
    batching_only()
    assert audit_logger.handlers == []
    assert batch_handler(audit_logger) is None


# --- writing queued lines -------------------------------------------------------------------------


def test_queued_lines_go_out_in_one_write_through_the_batching_handler(
    stream: CountingStream,
) -> None:
    batching_only()
    write_lines(LINES)

    assert stream.writes == 1
    assert stream.getvalue().splitlines() == [f"INFO sidecar.audit: exchange {x}" for x in LINES]


def test_without_the_batching_handler_each_line_is_a_log_record(
    audit_logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)

    write_lines(LINES)

    records = [r for r in caplog.records if r.name == AUDIT_LOGGER]
    assert [r.getMessage() for r in records] == [f"exchange {line}" for line in LINES]
    assert {r.levelno for r in records} == {logging.INFO}


def test_no_queued_lines_write_nothing(stream: CountingStream) -> None:
    batching_only()
    write_lines([])
    assert stream.writes == 0


def test_log_event_is_one_record_with_the_line_as_its_argument(
    audit_logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)

    log_event(LINES[0])

    [record] = [r for r in caplog.records if r.name == AUDIT_LOGGER]
    assert (record.msg, record.args) == ("exchange %s", (LINES[0],))
    assert record.levelname == "INFO"


def test_log_event_respects_the_loggers_level(
    audit_logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=AUDIT_LOGGER)
    log_event(LINES[0])
    assert [r for r in caplog.records if r.name == AUDIT_LOGGER] == []


def test_log_event_respects_the_loggers_filters(
    audit_logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    audit_logger.addFilter(lambda record: False)
    log_event(LINES[0])
    assert [r for r in caplog.records if r.name == AUDIT_LOGGER] == []


# --- an event's values and its line ---------------------------------------------------------------


EVENT = AuditEvent(
    at=1_800_000_000.123456,
    decision=GRANTED,
    client_id="gateway",
    subject="üser-ñ",
    audiences=["https://code-search.internal/mcp"],
    scope="code.read",
    jti="jti-1",
    expires_at=1_800_000_120.0,
    kid="key-1",
)


def test_event_values_are_every_field_in_order() -> None:
    values = event_values(EVENT)
    assert list(values) == list(FIELDS)
    assert values == {name: getattr(EVENT, name) for name in FIELDS}


def test_a_log_line_is_compact_json_that_reads_back_exactly() -> None:
    line = log_line(event_values(EVENT))

    assert json.loads(line) == event_values(EVENT)  # floats and text exact
    assert ", " not in line
    assert ": " not in line


def test_a_log_line_is_ascii() -> None:
    line = log_line(event_values(EVENT))
    assert line.isascii()
    assert '"subject":"\\u00fcser-\\u00f1"' in line


def test_the_module_logs_as_sidecar_audit() -> None:
    assert auditlog.log.name == AUDIT_LOGGER == "sidecar.audit"
