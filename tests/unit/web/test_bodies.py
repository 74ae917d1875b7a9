"""sidecar/web/bodies.py: an unread body is read before the answer, or the answer closes the
connection. (Over a real socket under ``sidecar serve``: tests/functional/test_http_safety.py.)"""

from __future__ import annotations

import io
from typing import Any

import pytest

from sidecar.web.bodies import FinishBodies, TrackedBody

LIMIT = 100


class Stream(io.BytesIO):
    """A body stream that records how much was read of it."""


def run(
    body: bytes, *, reads: int | None, headers: dict[str, str]
) -> tuple[list[tuple[str, str]], Stream]:
    """The headers FinishBodies answers with, when the app reads ``reads`` bytes (None: all)."""
    stream = Stream(body)

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
    FinishBodies(app, LIMIT)(environ, start_response)
    return sent, stream


def test_an_unread_body_within_the_cap_is_read_and_the_connection_kept() -> None:
    sent, stream = run(b"x" * 80, reads=0, headers={"CONTENT_LENGTH": "80"})
    assert ("Connection", "close") not in sent
    assert stream.tell() == 80


def test_a_partly_read_body_is_read_to_its_declared_end_and_no_further() -> None:
    sent, stream = run(b"x" * 50 + b"NEXT REQUEST", reads=10, headers={"CONTENT_LENGTH": "50"})
    assert ("Connection", "close") not in sent
    assert stream.tell() == 50


def test_a_body_over_the_cap_is_left_unread_and_the_connection_closed() -> None:
    sent, stream = run(b"x" * 500, reads=0, headers={"CONTENT_LENGTH": "500"})
    assert ("Connection", "close") in sent
    assert stream.tell() == 0


def test_a_body_read_by_the_app_changes_nothing() -> None:
    sent, _ = run(b"x" * 500, reads=None, headers={"CONTENT_LENGTH": "500"})
    assert sent == [("Content-Type", "application/json")]


@pytest.mark.parametrize(("size", "closes"), [(60, False), (LIMIT + 50, True)])
def test_a_chunked_body_is_read_up_to_the_cap(size: int, closes: bool) -> None:
    sent, stream = run(b"x" * size, reads=0, headers={"HTTP_TRANSFER_ENCODING": "chunked"})
    assert (("Connection", "close") in sent) is closes
    assert stream.tell() <= LIMIT + 16 * 1024


@pytest.mark.parametrize("length", ["", "0"])
def test_a_request_without_a_body_passes_through_untouched(length: str) -> None:
    stream = Stream(b"")
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen["input"] = environ["wsgi.input"]
        start_response("200 OK", [])
        return []

    FinishBodies(app, LIMIT)({"wsgi.input": stream, "CONTENT_LENGTH": length}, lambda *a: None)
    assert seen["input"] is stream


def test_a_length_that_is_not_a_number_is_never_read_as_one() -> None:
    sent, stream = run(b"x" * 10, reads=0, headers={"CONTENT_LENGTH": "1e3"})
    assert ("Connection", "close") in sent
    assert stream.tell() == 0


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
