"""A request's body is read to its end before its answer goes out, or the answer says
``Connection: close``.

Many refusals are decided before the body is read (a query string on ``/token``, an admin
request without credentials, a body over the size cap). granian hands the app the body as a
stream; when the app answers without reading it, hyper cannot reuse the connection and closes it
after the answer, without saying so. A client that sends its next request on that kept-alive
connection meanwhile loses it (``Connection aborted``; RFC 9112 §9.3: a client may resend only
idempotent requests, and ``POST /token`` is not one). So, as the answer starts:

- a body of known length within :data:`~sidecar.exchange.request.MAX_BODY_BYTES` that the app
  left unread is read and dropped (the bytes a valid request of that size would have been read
  for anyway), and the connection stays usable;
- any other (over the cap, or chunked beyond it) gets ``Connection: close`` (RFC 9112 §9.6): the
  client knows not to reuse the connection. gunicorn drops that header and reads an unread body
  itself before the next request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
# One read of the drain; bounded so that a body is never held in memory whole.
_CHUNK = 16 * 1024


class TrackedBody:
    """``wsgi.input`` that counts what the app read, and can read the rest."""

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

    def drain(self, limit: int) -> bool:
        """Read and drop what the app left, up to ``limit`` bytes in all; whether the body's end
        was reached."""
        if self.complete:
            return True
        if self._length is not None and self._length > limit:
            return False
        while not self.complete and self._seen <= limit:
            wanted = _CHUNK if self._length is None else min(_CHUNK, self._length - self._seen)
            self.read(wanted)
        return self.complete


class FinishBodies:
    """WSGI middleware: see the module docstring. ``limit``: the largest body drained."""

    def __init__(self, app: WSGIApp, limit: int) -> None:
        self._app = app
        self._limit = limit

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
            # never read as a length (too long for the cap either way).
            digits = length_header.isascii() and length_header.isdigit()
            length = int(length_header) if digits and len(length_header) <= 12 else self._limit + 1
        body = TrackedBody(environ.get("wsgi.input"), length)
        environ["wsgi.input"] = body

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if not body.drain(self._limit):
                headers = [*headers, ("Connection", "close")]
            if exc_info is None:
                return start_response(status, headers)
            return start_response(status, headers, exc_info)

        return self._app(environ, start)
