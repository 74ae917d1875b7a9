"""The ``sidecar.audit`` log on a stream, written by the audit writer a batch at a time.

Why: one log line per exchange through the logging module cost the request a ``LogRecord``, a
formatted time stamp and a ``write`` + ``flush`` of its own (measured with py-spy under ``make
bench`` on the cached path: 13% of a worker's time). The service installs this handler on
the ``sidecar.audit`` logger (:func:`install`); the audit trail then hands it the events' JSON
lines from its writer thread, all those queued since the last batch in one ``write``. Each line
has the same prefix as every other log line of the service (one ``LogRecord`` formatted per
batch: the time is the batch's, within ``audit.FLUSH_INTERVAL`` of the decisions, whose own time
is the ``at`` field of the JSON).

Without this handler (a library user's own logging set-up, pytest's caplog) each event goes
through the logging module as an ordinary record, when it is recorded.
"""

from __future__ import annotations

import json
import logging
from typing import IO, Any

from pythonjsonlogger.json import JsonFormatter

from sidecar.audit.event import FIELDS, AuditEvent
from sidecar.logs import RequestIdFilter

AUDIT_LOGGER = "sidecar.audit"
MESSAGE = "exchange "  # each audit line is "exchange {json}"


class AuditLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that also writes many audit lines at once (:meth:`write_lines`)."""

    json = False  # set by install() when the formatter writes JSON objects

    def write_lines(self, lines: list[str]) -> None:
        """The JSON lines, each after the formatter's prefix and ``exchange``, in one write."""
        if not lines:
            return
        record = logging.LogRecord(
            AUDIT_LOGGER, logging.INFO, __file__, 0, "exchange" if self.json else "", None, None
        )
        record.request_suffix = ""  # a batch belongs to no request (its events name theirs)
        try:
            if self.json:
                # One JSON object per event: the formatter's object for the batch (time, level,
                # logger, message, process), the event's own object merged in.
                head = self.format(record)[:-1] + ","
                text = "".join([head + line[1:] + self.terminator for line in lines])
            else:
                prefix = self.format(record) + MESSAGE
                text = "".join([prefix + line + self.terminator for line in lines])
            with self.lock:  # type: ignore[union-attr]
                self.stream.write(text)
                self.flush()
        except Exception:
            self.handleError(record)


def install(stream: IO[str] | None, formatter: logging.Formatter) -> AuditLogHandler:
    """Route the ``sidecar.audit`` logger to ``stream`` through one batching handler (and not to
    the root logger's handlers, which would write each line a second time)."""
    logger = logging.getLogger(AUDIT_LOGGER)
    for handler in list(logger.handlers):
        if isinstance(handler, AuditLogHandler):
            logger.removeHandler(handler)
    handler = AuditLogHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(RequestIdFilter())  # the request id fields the formats name
    handler.json = isinstance(formatter, JsonFormatter)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return handler


def batch_handler(logger: logging.Logger) -> AuditLogHandler | None:
    """The batching handler when it is the logger's only way out and INFO is enabled; None when
    the events must go through the logging module one by one."""
    handlers = logger.handlers
    if (
        len(handlers) == 1
        and not logger.propagate
        and not logger.filters
        and type(handlers[0]) is AuditLogHandler
        and logger.isEnabledFor(logging.INFO)
    ):
        return handlers[0]
    return None


log = logging.getLogger(AUDIT_LOGGER)
encode = json.JSONEncoder(separators=(",", ":")).encode  # built once, not per event


def event_values(event: AuditEvent) -> dict[str, Any]:
    return {name: getattr(event, name) for name in FIELDS}


def log_line(values: dict[str, Any]) -> str:
    return encode(values)


def log_event(line: str) -> None:
    """``log.info("exchange %s", line)``, without the caller lookup (a stack walk per event that
    no format of ours shows); the record goes through the logger's level, filters and handlers."""
    if log.isEnabledFor(logging.INFO):
        log.handle(
            log.makeRecord(log.name, logging.INFO, __file__, 0, "exchange %s", (line,), None)
        )


def write_lines(lines: list[str]) -> None:
    """Queued log lines in one write; one by one through the logging module when the batching
    handler was removed since they were queued."""
    if not lines:
        return
    handler = batch_handler(log)
    if handler is not None:
        handler.write_lines(lines)
    else:
        for line in lines:
            log_event(line)
