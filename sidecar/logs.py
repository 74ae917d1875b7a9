"""The service's log records: one format for all of them, the server's included.

``log.format: json`` writes one JSON object per line (python-json-logger's formatter) with the
time in RFC 3339 UTC, the level, the logger, the message, the process and the request id of the
request being served; ``text`` writes the same fields as a plain line. Under ``sidecar serve``
the default (``auto``) is JSON when stderr is not a terminal. The request id comes from the
request's ``X-Request-ID`` header when it is a short token, else is generated, and is returned in
the response (:mod:`sidecar.web.token`'s router sets it for every request).
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import sys
import uuid
from contextvars import ContextVar
from typing import IO, Any

from pythonjsonlogger.json import JsonFormatter

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
REQUEST_ID_HEADER = "X-Request-ID"
# A request id taken from a client: short, and nothing that could break a log line or a header.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
TEXT_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s%(request_suffix)s: %(message)s"
JSON_FIELDS = ("asctime", "levelname", "name", "message", "process")
RENAMED = {"asctime": "time", "levelname": "level", "name": "logger", "process": "pid"}


def rfc3339(epoch: float) -> str:
    """``2026-12-07T04:00:00.000Z``: RFC 3339, UTC, milliseconds."""
    moment = datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def request_id_from(header: str | None) -> str:
    """The client's request id when it is a short token, else a new one."""
    if header is not None and _REQUEST_ID.match(header):
        return header
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Adds the request id of the request being served (None outside one) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        record.request_id = request_id
        record.request_suffix = f" [{request_id}]" if request_id else ""
        return True


class Rfc3339Formatter(JsonFormatter):
    """python-json-logger's formatter with the time in RFC 3339 UTC (milliseconds, ``Z``)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return rfc3339(record.created)


class TextFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return rfc3339(record.created)


def formatter(kind: str) -> logging.Formatter:
    if kind == "json":
        return Rfc3339Formatter(
            list(JSON_FIELDS),
            rename_fields=RENAMED,
            static_fields=None,
            reserved_attrs=[*_RESERVED, "request_suffix"],
        )
    return TextFormatter(TEXT_FORMAT, defaults={"request_suffix": ""})


_RESERVED = [
    "args",
    "created",
    "exc_info",
    "exc_text",
    "filename",
    "funcName",
    "levelno",
    "lineno",
    "module",
    "msecs",
    "msg",
    "pathname",
    "processName",
    "relativeCreated",
    "stack_info",
    "thread",
    "threadName",
    "taskName",
]


def resolve(kind: str, stream: IO[str] | None = None) -> str:
    """``auto``: JSON unless the stream is a terminal."""
    if kind != "auto":
        return kind
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    return "text" if callable(isatty) and isatty() else "json"


def configure(kind: str, stream: IO[str] | None = None) -> logging.Formatter:
    """Every record of the process (root, sidecar.*, the server's loggers) through one handler
    on ``stream`` (stderr) in the format ``kind``; returns that formatter."""
    stream = stream or sys.stderr
    root = logging.getLogger()
    for handler in root.handlers:
        if isinstance(handler.formatter, Rfc3339Formatter | TextFormatter):
            # The server's logging configuration (dict_config) already writes in this format.
            return handler.formatter
    chosen = formatter(resolve(kind, stream))
    for handler in list(root.handlers):
        if getattr(handler, "_sidecar", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(chosen)
    handler.addFilter(RequestIdFilter())
    handler._sidecar = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # The servers' own loggers write through the same handler.
    for name in ("_granian", "granian.access", "gunicorn.error", "gunicorn.access"):
        server_logger = logging.getLogger(name)
        server_logger.handlers.clear()
        server_logger.propagate = True
    return chosen


def dict_config(kind: str) -> dict[str, Any]:
    """A logging dictConfig of the same format, for a server that configures logging itself
    (granian's ``log_dictconfig``, gunicorn's ``logconfig_dict``)."""
    resolved = resolve(kind)
    chosen: dict[str, Any]
    if resolved == "json":
        chosen = {
            "()": "sidecar.logs.Rfc3339Formatter",
            "fmt": list(JSON_FIELDS),
            "rename_fields": RENAMED,
            "reserved_attrs": [*_RESERVED, "request_suffix"],
        }
    else:
        chosen = {"()": "sidecar.logs.TextFormatter", "fmt": TEXT_FORMAT}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": "sidecar.logs.RequestIdFilter"}},
        "formatters": {"sidecar": chosen},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "sidecar",
                "filters": ["request_id"],
            }
        },
        "root": {"handlers": ["stderr"], "level": "INFO"},
        "loggers": {
            "_granian": {"handlers": [], "propagate": True, "level": "INFO"},
            "granian.access": {"handlers": [], "propagate": True, "level": "INFO"},
            "gunicorn.error": {"handlers": [], "propagate": True, "level": "INFO"},
            # Alembic's plugin set-up lines at every start are noise in a service's log.
            "alembic": {"handlers": [], "propagate": True, "level": "WARNING"},
            # gunicorn writes access lines whenever a logging configuration is given: kept off
            # unless asked for (every /token answer is in the audit trail already).
            "gunicorn.access": {
                "handlers": [],
                "propagate": True,
                "level": "INFO" if os.environ.get("SIDECAR_ACCESS_LOG") else "WARNING",
            },
        },
    }
