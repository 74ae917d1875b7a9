"""Real network dependencies on loopback for fault and hostile-input tests: an HTTP server that
counts every request it receives (an issuer's JWKS endpoint, or a `jku` an attacker points at),
and a TCP proxy in front of a real database that can be stopped, restarted and slowed down."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- an HTTP server that counts ---------------------------------------------------------------


class CountingHttpServer:
    """Answers every GET with ``document`` (JSON, or raw bytes), counting requests by path.

    ``status`` (0: close the connection unanswered) and ``delay`` change the answer; a delayed
    answer waits on an event that :meth:`stop` sets, so no handler thread outlives the test."""

    def __init__(self, document: Any = None) -> None:
        self.document: Any = document if document is not None else {"keys": []}
        self.status = 200
        self.delay = 0.0
        self.paths: list[str] = []
        self.in_flight = 0  # requests received and not yet answered
        self._released = threading.Event()
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner._answer(self)

            do_POST = do_HEAD = do_GET

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.paths)

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.paths.append(handler.path)
            self.in_flight += 1
        try:
            self._respond(handler)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _respond(self, handler: BaseHTTPRequestHandler) -> None:
        if self.delay:
            self._released.wait(self.delay)
        if self.status == 0:  # drop the connection without a word
            handler.close_connection = True
            return
        document = self.document
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        try:
            handler.send_response(self.status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        except OSError:
            pass  # the client gave up waiting (a fetch timeout): nothing to answer

    def stop(self) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


# --- a TCP proxy that can fail ----------------------------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:<port> to ``upstream``, each connection pumped by one thread.

    :meth:`stop` closes the listener and every connection (the database is gone: connections
    are refused); :meth:`start` listens again on the same port. :meth:`slow` holds every chunk,
    on new and established connections alike, that long before forwarding it (the database, or
    the network to it, is slow); :meth:`fast` releases what is held and forwards at once again."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._delay = 0.0
        self._released = threading.Event()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def slow(self, delay: float) -> None:
        self._released.clear()
        self._delay = delay

    def fast(self) -> None:
        self._delay = 0.0
        self._released.set()

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._stopped = threading.Event()
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener, self._stopped), daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()
        self._released.set()
        with self._lock:
            sockets, self._sockets = self._sockets, set()
            listener, self._listener = self._listener, None
        for sock in (*sockets, *([listener] if listener else [])):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket, stopped: threading.Event) -> None:
        while not stopped.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if stopped.is_set():
                    client.close()
                    server.close()
                    return
                self._sockets.update((client, server))
            threading.Thread(target=self._pump, args=(client, server, stopped), daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket, stopped: threading.Event) -> None:
        peers = {client: server, server: client}
        with selectors.DefaultSelector() as selector:
            for sock in peers:
                sock.setblocking(True)
                selector.register(sock, selectors.EVENT_READ)
            while not stopped.is_set():
                try:
                    events = selector.select(0.1)
                    for key, _ in events:
                        source: socket.socket = key.fileobj  # type: ignore[assignment]
                        data = source.recv(65536)
                        if not data:
                            raise ConnectionError("closed")
                        if self._delay:
                            self._released.wait(self._delay)
                        peers[source].sendall(data)
                except (OSError, ValueError):
                    break
        for sock in peers:
            sock.close()


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def kill_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a server and, when it leads its own process group (``start_new_session``), every
    process of that group: granian's workers outlive a master killed alone."""
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
