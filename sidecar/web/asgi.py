"""The WSGI app under gunicorn's asyncio worker (``sidecar.worker.BalancedAsgiWorker``, the
default of ``deploy/gunicorn.conf.py``).

Why: the exchange is CPU work over in-process state, and a worker runs it under one GIL. With a
thread per request (gthread) every request is handed between threads, and a thread returning
from a socket call waits for the GIL behind another thread's request (up to the interpreter's
5 ms switch interval): throughput and tail latency both suffer. Here ``POST /token`` is answered
on the event loop thread itself, as soon as its body is in, with no hand-off; gunicorn's asyncio
protocol (with the C parser of ``gunicorn[fast]``) does the HTTP.

What may wait on I/O never runs on the loop (see :mod:`sidecar.blocking`):
- ``/token`` with a client assertion (``private_key_jwt``: its ``jti`` goes to the database, the
  client's keys may be fetched) goes straight to a thread of the pool;
- ``/token`` whose exchange would wait (a JWKS fetch, a first load of the policies or keys, the
  audit backpressure) raises WouldBlock before waiting and is answered again on a thread;
- every other path (JWKS, metadata, health, metrics, the admin API) is Flask's, on the pool.
"""

from __future__ import annotations

import asyncio
import io
import logging
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sidecar.blocking import WouldBlock, on_event_loop
from sidecar.errors import ServerError
from sidecar.exchange.request import MAX_BODY_BYTES
from sidecar.web.responses import NO_STORE
from sidecar.web.token import RETRIED_ON_THREAD, error_body, log_unexpected

log = logging.getLogger(__name__)

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
Response = tuple[int, list[tuple[bytes, bytes]], bytes]
THREADS = 4  # the pool's threads, per worker
# A form naming a client assertion: never tried on the loop. A bytes search on the raw body; a
# false match (the name inside another name) only sends the request to the pool; a
# percent-encoded name slips past it, and the jti store refuses to write on the loop.
ASSERTION_MARK = b"client_assertion"
WsgiResponse = tuple[str, list[tuple[str, str]], bytes]
_SERVER_ERROR_BODY = error_body(ServerError())
_SERVER_ERROR_WSGI: WsgiResponse = (
    "500 Internal Server Error",
    [
        ("Content-Type", "application/json"),
        *NO_STORE.items(),
        ("Content-Length", str(len(_SERVER_ERROR_BODY))),
    ],
    _SERVER_ERROR_BODY,
)


def _asgi_response(answer: WsgiResponse) -> Response:
    status, headers, payload = answer
    return (
        int(status[:3]),
        [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers],
        payload,
    )


_SERVER_ERROR = _asgi_response(_SERVER_ERROR_WSGI)


class AsgiBridge:
    """An ASGI 3 application serving a WSGI app: ``/token`` inline, the rest on a pool."""

    def __init__(self, wsgi_app: WsgiApp, *, threads: int = THREADS) -> None:
        self._app = wsgi_app
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wsgi")
        self._retry_on_thread: set[Any] = set()  # client addresses: see tried_on_loop()
        # The worker hooks (deploy/gunicorn.conf.py) find the services here, as on a Flask app.
        self.extensions: dict[str, Any] = getattr(wsgi_app, "extensions", {})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets: not served
        body = await _read_body(receive)
        if body is None:
            return  # the client went away
        if (
            scope["method"] == "POST"
            and scope["path"] == "/token"
            and scope.get("root_path", "") == ""
            and ASSERTION_MARK not in body
            and not self._tried_on_loop(scope)
        ):
            response = self._inline(scope, body)
        else:
            response = None
        if response is None:
            loop = asyncio.get_running_loop()
            response = await loop.run_in_executor(self._pool, self._on_thread, scope, body)
        status, headers, payload = response
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    def tried_on_loop(self, client: Any) -> None:
        """The fast path (sidecar.web.fastpath) tried this client connection's next request on
        the loop and it would have waited: it goes straight to a thread, its rate-limit token
        taken already."""
        self._retry_on_thread.add(client)

    def forget(self, client: Any) -> None:
        self._retry_on_thread.discard(client)

    def _tried_on_loop(self, scope: dict[str, Any]) -> bool:
        if not self._retry_on_thread:
            return False
        client = tuple(scope.get("client") or ())
        if client in self._retry_on_thread:
            self._retry_on_thread.discard(client)
            return True
        return False

    def _inline(self, scope: dict[str, Any], body: bytes) -> Response | None:
        """The answer computed on the loop; None when it would have to wait on I/O."""
        try:
            with on_event_loop():
                return self._call(wsgi_environ(scope, body))
        except WouldBlock:
            return None

    def _on_thread(self, scope: dict[str, Any], body: bytes) -> Response:
        environ = wsgi_environ(scope, body)
        environ[RETRIED_ON_THREAD] = scope["path"] == "/token"
        try:
            return self._call(environ)
        except WouldBlock as exc:  # may_block() only raises on the loop: a bug if it gets here
            log_unexpected(exc)
            return _SERVER_ERROR

    def _call(self, environ: dict[str, Any]) -> Response:
        return _asgi_response(self.run_app(environ))

    def run_app(self, environ: dict[str, Any]) -> WsgiResponse:
        """The WSGI app's answer: its status line, headers and whole body. Raises WouldBlock as
        the app does, and nothing else: any other failure comes back as a bare 500."""
        started: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            if exc_info is not None and started:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [status, headers]
            return _no_write

        try:
            result = self._app(environ, start_response)
            try:
                payload = b"".join(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            status, headers = started  # ValueError if the app never started a response
        except WouldBlock:
            raise
        except Exception as exc:  # the apps answer their own errors: this is a last resort
            log_unexpected(exc)
            return _SERVER_ERROR_WSGI
        return status, headers, payload


def _no_write(data: bytes) -> None:
    raise RuntimeError("the write() callable of start_response is not supported")


async def _lifespan(receive: Any, send: Any) -> None:
    # Nothing to start or stop here: each worker builds its services when it loads the app, and
    # worker_exit (deploy/gunicorn.conf.py) writes the audit queue when it stops.
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Any) -> bytes | None:
    """The request body, cut one byte past the size cap: both apps refuse a body over the cap
    from its Content-Length, and nothing is kept of what lies beyond."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None  # http.disconnect
        chunk = message.get("body", b"")
        if size <= MAX_BODY_BYTES:
            chunks.append(chunk[: MAX_BODY_BYTES + 1 - size])
        size += len(chunk)
        if not message.get("more_body", False) or size > MAX_BODY_BYTES:
            return b"".join(chunks)


def wsgi_environ(scope: dict[str, Any], body: bytes) -> dict[str, Any]:
    """PEP 3333 environ of an ASGI HTTP scope. ``SERVER_NAME``/``SERVER_PORT`` are the local
    socket's address (as gunicorn's own WSGI gives them), never the Host header's."""
    server = scope.get("server") or ("", None)
    client = scope.get("client") or ("", 0)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": scope.get("root_path", "").encode("utf-8").decode("latin-1"),
        "PATH_INFO": scope["path"].encode("utf-8").decode("latin-1"),
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": "" if server[1] is None else str(server[1]),
        "SERVER_PROTOCOL": "HTTP/" + scope.get("http_version", "1.1"),
        "REMOTE_ADDR": str(client[0]),
        "REMOTE_PORT": str(client[1]),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        if name == "content-type":
            key = "CONTENT_TYPE"
        elif name == "content-length":
            key = "CONTENT_LENGTH"
        else:
            key = "HTTP_" + name.upper().replace("-", "_")
        if key in environ:
            # Repeated: joined as RFC 9110 §5.3 allows. Two Content-Length values do not make
            # a digit string, and /token refuses them.
            environ[key] += "," + value
        else:
            environ[key] = value
    return environ
