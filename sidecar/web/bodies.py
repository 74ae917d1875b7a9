"""An answer given before the request's body was read says ``Connection: close``.

Many refusals are decided before the body is read (a query string on ``/token``, an admin
request without credentials, a method a path does not take, a body over the size cap). granian
hands the app the body as a stream; when the app answers without reading it, hyper cannot reuse
the connection and closes it after the answer. Unless the answer says so (RFC 9112 §9.6), a
client sends its next request on that kept-alive connection and loses it (``Connection
aborted``; RFC 9112 §9.3.1: a client may resend only idempotent requests, and ``POST /token`` is
not one).

The unread body is never read here to keep the connection: a client that sends a head and
withholds the body would hold an app thread for as long as it liked, on any path of any
listener. A client that is refused opens a new connection instead. (gunicorn drops the header
and reads an unread body itself before the next request.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class TrackedBody:
    """``wsgi.input`` that knows whether the app read it to its end."""

    def __init__(self, stream: Any, length: int | None) -> None:
        self._stream = stream
        self._length = length  # None: chunked, of unknown length
        self._seen = 0
        self._ended = False

    @property
    def complete(self) -> bool:
        return self._ended or (self._length is not None and self._seen >= self._length)

    def _count(self, data: bytes, size: int | None) -> bytes:
        self._seen += len(data)
        if size is None or size < 0 or (size > 0 and not data):
            self._ended = True  # a read to the end, or an empty read: nothing more comes
        return data

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self._count(self._stream.read(), None)
        return self._count(self._stream.read(size), size)

    def readline(self, size: int | None = -1) -> bytes:
        line = self._stream.readline() if size is None or size < 0 else self._stream.readline(size)
        return self._count(line, 1)

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines = list(self._stream.readlines())
        self._count(b"".join(lines), None)
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line


class CloseOnUnreadBody:
    """WSGI middleware: see the module docstring."""

    def __init__(self, app: WSGIApp) -> None:
        self._app = app

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        length_header = environ.get("CONTENT_LENGTH", "")
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if not chunked and length_header in ("", "0"):
            return self._app(environ, start_response)
        length: int | None = None
        if not chunked:
            # The server checked the framing; a value that is not a plain number is still
            # never read as a length (one that no read completes).
            digits = length_header.isascii() and length_header.isdigit()
            length = int(length_header) if digits and len(length_header) <= 18 else 2**63
        body = TrackedBody(environ.get("wsgi.input"), length)
        environ["wsgi.input"] = body

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if not body.complete:
                headers = [*headers, ("Connection", "close")]
            if exc_info is None:
                return start_response(status, headers)
            return start_response(status, headers, exc_info)

        return self._app(environ, start)
