"""Every answer the app writes: one place turns a token response, a protocol error or an
unexpected exception into status, headers and body, for the bare WSGI token endpoint and for the
Flask views alike (RFC 6749 §5.1 and §5.2)."""

from __future__ import annotations

import json
import logging
import traceback
from http import HTTPStatus
from typing import Any

from flask import Response

from sidecar.errors import ProtocolError, ServerError

log = logging.getLogger("sidecar.web.app")

# RFC 6749 §5.1: "Cache-Control: no-store" and "Pragma: no-cache" on every token response.
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
JSON_NO_STORE = [("Content-Type", "application/json"), *NO_STORE.items()]
STATUS_LINES = {status.value: f"{status.value} {status.phrase}" for status in HTTPStatus}
Headers = list[tuple[str, str]]


def log_unexpected(exc: BaseException) -> None:
    # The traceback frames, not the message: a message may quote request input.
    log.error(
        "unexpected %s\n%s", type(exc).__name__, "".join(traceback.format_tb(exc.__traceback__))
    )


def token_answer(body: dict[str, Any]) -> tuple[int, Headers, bytes]:
    """RFC 6749 §5.1 (RFC 8693 §2.2.1) successful response."""
    encoded = json.dumps(body, separators=(",", ":")).encode()
    return 200, [*JSON_NO_STORE, ("Content-Length", str(len(encoded)))], encoded


def error_answer(error: ProtocolError) -> tuple[int, Headers, bytes]:
    """RFC 6749 §5.2 error response: the fixed description (never request input), the no-store
    headers and the error's own (``WWW-Authenticate``, ``Retry-After``)."""
    body = {"error": error.error, "error_description": error.description}
    encoded = json.dumps(body, separators=(",", ":")).encode()
    headers = [*JSON_NO_STORE, *error.response_headers().items()]
    return error.status_code, [*headers, ("Content-Length", str(len(encoded)))], encoded


def protocol_error_response(error: ProtocolError) -> Response:
    status, headers, body = error_answer(error)
    return Response(body, status=status, headers=headers)


def unexpected_error_response(exc: BaseException) -> Response:
    log_unexpected(exc)
    return protocol_error_response(ServerError())


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(body, separators=(",", ":")),
        # The whole status line, with its RFC 9110 reason phrase: given only the code, werkzeug
        # writes its own upper-case phrase, and a server writes what the app gave it.
        status=STATUS_LINES.get(status, str(status)),
        mimetype="application/json",
        headers=headers,
    )
