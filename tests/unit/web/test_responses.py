"""Every answer the app writes (``sidecar/web/responses.py``): the token response, the error
response of a protocol error, and the one for an unexpected exception, for the bare WSGI token
endpoint (status, header list, body) and for the Flask views (a ``Response``).

- RFC 6749 §5.1: a JSON body, ``Cache-Control: no-store`` and ``Pragma: no-cache``;
- RFC 6749 §5.2: the error body (``error``, ``error_description``), the error's own headers
  (``WWW-Authenticate`` after Basic; ``Retry-After`` with 429 / 503, RFC 6585 §4, RFC 9110
  §10.2.3), and never request input: the fixed description goes out, the internal ``reason``
  never does;
- an unexpected exception is a bare ``server_error`` 500, and its log entry holds the traceback
  frames, never the exception's message (which may quote the request).
"""

from __future__ import annotations

import json
import logging

import pytest

from sidecar.errors import (
    InvalidClientError,
    InvalidRequestError,
    InvalidTargetError,
    ProtocolError,
    RateLimitedError,
    ServerError,
    TemporarilyUnavailableError,
)
from sidecar.web.responses import (
    STATUS_LINES,
    error_answer,
    json_response,
    log_unexpected,
    protocol_error_response,
    token_answer,
    unexpected_error_response,
)

JSON_NO_STORE = [
    ("Content-Type", "application/json"),
    ("Cache-Control", "no-store"),
    ("Pragma", "no-cache"),
]
REQUEST_INPUT = "eyJhbGciOiJSUzI1NiJ9.from-the-request"


# --- token_answer -------------------------------------------------------------------------------


def test_a_token_answer_is_200_compact_json_with_no_store() -> None:
    body = {"access_token": "a.b.c", "token_type": "Bearer", "expires_in": 60, "scope": "x"}

    status, headers, encoded = token_answer(body)

    assert status == 200
    assert headers == [*JSON_NO_STORE, ("Content-Length", str(len(encoded)))]
    assert json.loads(encoded) == body
    assert b" " not in encoded  # compact: no separators' spaces


# --- error_answer -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [InvalidRequestError(), InvalidTargetError(), ServerError(), InvalidClientError()],
    ids=lambda error: error.error,
)
def test_an_error_answer_is_the_rfc6749_error_body_with_no_store(error: ProtocolError) -> None:
    status, headers, encoded = error_answer(error)

    assert status == error.status_code
    assert headers == [*JSON_NO_STORE, ("Content-Length", str(len(encoded)))]
    assert json.loads(encoded) == {"error": error.error, "error_description": error.description}


def test_an_invalid_client_after_basic_carries_www_authenticate() -> None:
    status, headers, _ = error_answer(InvalidClientError(basic=True))

    assert status == 401
    challenges = [value for name, value in headers if name == "WWW-Authenticate"]
    assert challenges == ['Basic realm="token-exchange-sidecar", charset="UTF-8"']


def test_an_invalid_client_without_basic_carries_no_www_authenticate() -> None:
    _, headers, _ = error_answer(InvalidClientError())

    assert "WWW-Authenticate" not in dict(headers)


@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [
        (TemporarilyUnavailableError(retry_after=7), 503, "7"),
        (RateLimitedError(retry_after=3), 429, "3"),
    ],
    ids=["503", "429"],
)
def test_a_retryable_error_carries_retry_after(
    error: ProtocolError, status: int, retry_after: str
) -> None:
    answered, headers, encoded = error_answer(error)

    assert answered == status
    assert dict(headers)["Retry-After"] == retry_after
    assert json.loads(encoded)["error"] == "temporarily_unavailable"


def test_the_reason_never_reaches_the_body() -> None:
    error = InvalidRequestError(reason=f"subject token {REQUEST_INPUT} failed verification")

    _, headers, encoded = error_answer(error)

    assert REQUEST_INPUT.encode() not in encoded
    assert json.loads(encoded)["error_description"] == "The request is malformed."
    assert all(REQUEST_INPUT not in value for _, value in headers)


def test_status_lines_have_their_reason_phrases() -> None:
    assert STATUS_LINES[200] == "200 OK"
    assert STATUS_LINES[400] == "400 Bad Request"
    assert STATUS_LINES[401] == "401 Unauthorized"
    assert STATUS_LINES[429] == "429 Too Many Requests"
    assert STATUS_LINES[500] == "500 Internal Server Error"
    assert STATUS_LINES[503] == "503 Service Unavailable"


# --- the Flask responses ------------------------------------------------------------------------


def test_a_protocol_error_response_is_the_same_answer_as_a_flask_response() -> None:
    error = TemporarilyUnavailableError(retry_after=9)
    status, headers, encoded = error_answer(error)

    response = protocol_error_response(error)

    assert response.status_code == status
    assert response.get_data() == encoded
    assert [(name, response.headers[name]) for name, _ in headers] == headers


def test_json_response_is_compact_json_with_the_given_status_and_headers() -> None:
    response = json_response({"b": [1, 2], "a": None}, status=201, headers={"Location": "/x"})

    assert response.status_code == 201
    assert response.mimetype == "application/json"
    assert response.get_data() == b'{"b":[1,2],"a":null}'
    assert response.headers["Location"] == "/x"


# --- unexpected exceptions ----------------------------------------------------------------------


def fail_deep_inside(message: str) -> None:
    raise ValueError(message)  # the message comes from the caller: it is not in this frame's source


def raised_error(message: str) -> ValueError:
    try:
        fail_deep_inside(message)
    except ValueError as exc:
        return exc
    raise AssertionError("not raised")


def test_an_unexpected_error_response_is_a_bare_server_error() -> None:
    response = unexpected_error_response(raised_error(f"bad input {REQUEST_INPUT}"))

    assert response.status_code == 500
    assert json.loads(response.get_data()) == {
        "error": "server_error",
        "error_description": "Internal error.",
    }
    assert response.headers["Cache-Control"] == "no-store"
    assert REQUEST_INPUT.encode() not in response.get_data()


def test_an_unexpected_error_logs_its_frames_not_its_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="sidecar.web.app")

    unexpected_error_response(raised_error(f"bad input {REQUEST_INPUT}"))

    (record,) = [r for r in caplog.records if r.name == "sidecar.web.app"]
    assert record.levelno == logging.ERROR
    logged = record.getMessage()
    assert logged.startswith("unexpected ValueError\n")
    assert "fail_deep_inside" in logged  # the frames, down to where it was raised
    assert REQUEST_INPUT not in logged
    assert record.exc_info is None  # no formatter may add the message back


def test_an_exception_never_raised_logs_its_type_alone(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="sidecar.web.app")

    log_unexpected(RuntimeError(REQUEST_INPUT))

    assert [r.getMessage() for r in caplog.records] == ["unexpected RuntimeError\n"]
