"""sidecar/web/bodies.py: an answer given before the body was read says ``Connection: close``,
and nothing is read on the app's behalf. (Over a real socket under ``sidecar serve``:
tests/functional/test_http_safety.py.)"""

from __future__ import annotations

import io
from typing import Any

import pytest

from sidecar.web.bodies import CloseOnUnreadBody, TrackedBody

CLOSE = ("Connection", "close")


def run(
    body: bytes, *, reads: int | None, headers: dict[str, str]
) -> tuple[list[tuple[str, str]], io.BytesIO]:
    """The headers CloseOnUnreadBody answers with when the app reads ``reads`` bytes (None: all),
    and the body stream (to see how much was read of it)."""
    stream = io.BytesIO(body)

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if reads is None:
            environ["wsgi.input"].read()
        elif reads:
            environ["wsgi.input"].read(reads)
        start_response("400 Bad Request", [("Content-Type", "application/json")])
        return [b"{}"]

    sent: list[tuple[str, str]] = []

    def start_response(status: str, response_headers: list[tuple[str, str]]) -> None:
        sent.extend(response_headers)

    environ = {"wsgi.input": stream, **headers}
    CloseOnUnreadBody(app)(environ, start_response)
    return sent, stream


def test_an_unread_body_closes_the_connection_and_is_not_read() -> None:
    sent, stream = run(b"x" * 80, reads=0, headers={"CONTENT_LENGTH": "80"})
    assert CLOSE in sent
    assert stream.tell() == 0


def test_a_partly_read_body_closes_the_connection() -> None:
    sent, stream = run(b"x" * 50, reads=10, headers={"CONTENT_LENGTH": "50"})
    assert CLOSE in sent
    assert stream.tell() == 10


@pytest.mark.parametrize("reads", [None, 50], ids=["read()", "read(length)"])
def test_a_body_read_to_its_end_changes_nothing(reads: int | None) -> None:
    sent, _ = run(b"x" * 50, reads=reads, headers={"CONTENT_LENGTH": "50"})
    assert sent == [("Content-Type", "application/json")]


def test_a_chunked_body_counts_as_read_once_a_read_came_back_empty() -> None:
    assert CLOSE in run(b"x" * 60, reads=60, headers={"HTTP_TRANSFER_ENCODING": "chunked"})[0]
    assert CLOSE not in run(b"x" * 60, reads=None, headers={"HTTP_TRANSFER_ENCODING": "chunked"})[0]


@pytest.mark.parametrize("length", ["", "0"])
def test_a_request_without_a_body_passes_through_untouched(length: str) -> None:
    stream = io.BytesIO(b"")
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen["input"] = environ["wsgi.input"]
        start_response("200 OK", [])
        return []

    CloseOnUnreadBody(app)({"wsgi.input": stream, "CONTENT_LENGTH": length}, lambda *a: None)
    assert seen["input"] is stream


def test_a_length_that_is_not_a_number_is_never_complete() -> None:
    sent, _ = run(b"x" * 10, reads=10, headers={"CONTENT_LENGTH": "1e3"})
    assert CLOSE in sent


def test_tracked_body_counts_reads_lines_and_iteration() -> None:
    body = TrackedBody(io.BytesIO(b"a\nb\nc"), 5)
    assert body.readline() == b"a\n"
    assert not body.complete
    assert list(body) == [b"b\n", b"c"]
    assert body.complete


def test_tracked_body_of_unknown_length_ends_at_an_empty_read() -> None:
    body = TrackedBody(io.BytesIO(b"abc"), None)
    assert body.read(3) == b"abc"
    assert not body.complete
    assert body.read(3) == b""
    assert body.complete
