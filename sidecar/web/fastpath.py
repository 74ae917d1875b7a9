"""A connection protocol that answers a plain ``POST /token`` straight from the bytes it read.

Why: under gunicorn's asyncio worker, every request passed through gunicorn's ASGI machinery (a
task woken by an event, an ASGI scope, receive and send coroutines) and then through the
ASGI-to-WSGI bridge, before and after the exchange itself. Measured with py-spy under ``make
bench`` on the cached path, that was a fifth of the event loop's time. This protocol (gunicorn's
own :class:`~gunicorn.asgi.protocol.ASGIProtocol`, extended) looks at each read first: when it
holds exactly one complete request of the narrow shape a gateway sends, it answers it at once,
through the same WSGI app and the same :class:`~sidecar.web.asgi.AsgiBridge` rules; anything
else goes to gunicorn's parser as it always did.

The shape, checked strictly (anything outside it is gunicorn's to parse, accept or refuse):
- the request line is exactly ``POST /token HTTP/1.1`` (no query string);
- every header line is ``token ":" OWS value OWS`` with no control character but HTAB in the
  value; at most ``MAX_HEADERS`` lines and ``MAX_HEAD_BYTES`` bytes;
- exactly one ``Content-Length`` of at most 7 digits and a ``Host``; no ``Transfer-Encoding``,
  ``Expect``, ``Upgrade``, ``HTTP2-Settings``, and no ``Connection`` but ``keep-alive``;
- the body of that length is all in the read (requests pipelined behind it are taken in turn,
  up to the first that is not of this shape, which goes to gunicorn with all that follows);
- the body names no ``client_assertion`` (those go to a thread: they may wait on the database).

A read that went to gunicorn's parser keeps the connection on gunicorn's path until gunicorn has
answered and reset its parser; the next read may then take the fast path again.
Nothing here runs gunicorn's ``pre_request``/``post_request`` hooks or its access log: the fast
path is off when either hook is set or the access log is on.
"""

from __future__ import annotations

import io
import logging
import re
import sys
from typing import Any

from gunicorn.asgi import protocol as gunicorn_protocol
from gunicorn.asgi.protocol import ASGIProtocol

from sidecar.blocking import WouldBlock, on_event_loop
from sidecar.web.asgi import ASSERTION_MARK, AsgiBridge
from sidecar.web.token import log_unexpected

log = logging.getLogger(__name__)

_REQUEST_LINE = b"POST /token HTTP/1.1\r\n"
MAX_HEADERS = 64
MAX_HEAD_BYTES = 8192
_HEADER = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*?)[ \t]*")
_REFUSED = frozenset((b"transfer-encoding", b"expect", b"upgrade", b"http2-settings"))
_SINGLE = frozenset((b"content-length", b"content-type", b"authorization", b"host"))


def _default_hook(cfg: Any, name: str) -> bool:
    setting = cfg.settings.get(name)
    return setting is not None and setting.value is setting.default


class FastTokenProtocol(ASGIProtocol):  # type: ignore[misc]
    """gunicorn's HTTP/1.x protocol, answering plain ``POST /token`` requests inline."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._fast_allowed = (
            isinstance(self.app, AsgiBridge)
            and self._callback_parser is not None
            and self._h2c_buffer is None
            and not self._is_ssl
            and getattr(self.cfg, "proxy_protocol", "off") == "off"
            and not self.log.access_log_enabled
            and _default_hook(self.cfg, "pre_request")
            and _default_hook(self.cfg, "post_request")
            and not getattr(self.cfg, "root_path", "")
        )
        self._fast = self._fast_allowed
        self._last_active = 0.0
        peer = transport.get_extra_info("peername")
        self._client = tuple(peer[:2]) if isinstance(peer, tuple) else ()  # as the ASGI scope
        # Never more than gunicorn itself would take (its limit_request_* settings; 0: none).
        self._max_headers = min(MAX_HEADERS, self.cfg.limit_request_fields or MAX_HEADERS)
        self._max_field = min(MAX_HEAD_BYTES, self.cfg.limit_request_field_size or MAX_HEAD_BYTES)
        if self._fast:
            sockname = transport.get_extra_info("sockname") or ("", None)
            peername = transport.get_extra_info("peername") or ("", 0)
            self._base_environ: dict[str, Any] = {
                "REQUEST_METHOD": "POST",
                "SCRIPT_NAME": "",
                "PATH_INFO": "/token",
                "QUERY_STRING": "",
                "SERVER_NAME": str(sockname[0]),
                "SERVER_PORT": "" if sockname[1] is None else str(sockname[1]),
                "SERVER_PROTOCOL": "HTTP/1.1",
                "REMOTE_ADDR": str(peername[0]),
                "REMOTE_PORT": str(peername[1]),
                "wsgi.version": (1, 0),
                "wsgi.url_scheme": "http",
                "wsgi.errors": sys.stderr,
                "wsgi.multithread": True,
                "wsgi.multiprocess": True,
                "wsgi.run_once": False,
            }

    def data_received(self, data: bytes) -> None:
        if self._fast:
            start = 0
            try:
                while start < len(data) and not self._closed:
                    end = self._answer(data, start)
                    if end < 0:
                        break
                    start = end
            except Exception as exc:  # a bug before the app ran: gunicorn's parser takes it
                log_unexpected(exc)
            if start == len(data) or self._closed:
                return
            data = data[start:]
            self._fast = False  # gunicorn's parser now holds this connection's state
            # Its own loop manages the idle timer from now on; this one must not close the
            # connection under a request gunicorn is serving.
            self._cancel_keepalive_timer()
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(self.app, AsgiBridge):
            self.app.forget(self._client)
        super().connection_lost(exc)

    def _answer(self, data: bytes, start: int) -> int:
        """Answer the request at ``data[start:]`` if it is a complete one of the fast path's
        shape, and return where it ends; -1 (having sent and recorded nothing) otherwise."""
        if (
            not data.startswith(_REQUEST_LINE, start)
            or self._current_request is not None
            or (self._flow_control is not None and self._flow_control.write_paused)
        ):
            return -1
        head_start = start + len(_REQUEST_LINE)
        end = data.find(b"\r\n\r\n", head_start - 2, start + MAX_HEAD_BYTES)
        if end < 0:
            return -1
        environ = self._environ(data[head_start:end])
        if environ is None:
            return -1
        body_end = end + 4 + int(environ["CONTENT_LENGTH"])
        if body_end > len(data):
            return -1  # the rest of the body is still on its way: gunicorn waits for it
        body = data[end + 4 : body_end]
        if ASSERTION_MARK in body:
            return -1
        environ["wsgi.input"] = io.BytesIO(body)
        bridge: AsgiBridge = self.app
        try:
            with on_event_loop():
                status, headers, payload = bridge.run_app(environ)
        except WouldBlock:
            # gunicorn's path answers it again, straight on a thread (its rate-limit token was
            # taken here, and is not taken again).
            bridge.tried_on_loop(self._client)
            return -1
        # (run_app raises nothing else: once the app ran, the request is answered here.)
        try:
            self._respond(status, headers, payload)
        except Exception as exc:  # the answer may be half written: end the connection
            log_unexpected(exc)
            self._close_transport()
        return body_end

    def _environ(self, head: bytes) -> dict[str, Any] | None:
        """The WSGI environ of the header block, or None when it is not of the fast shape."""
        lines = head.split(b"\r\n")
        if len(lines) > self._max_headers:
            return None
        environ = self._base_environ.copy()
        seen: set[bytes] = set()
        for line in lines:
            if len(line) + 2 > self._max_field:  # with its CRLF, as gunicorn counts
                return None
            match = _HEADER.fullmatch(line)
            if match is None:
                return None
            raw_name, raw_value = match.groups()
            name = raw_name.lower()
            if name in _REFUSED:
                return None
            if name in _SINGLE:
                if name in seen:
                    return None
                seen.add(name)
            value = raw_value.decode("latin-1")
            if name == b"content-length":
                if not (raw_value.isdigit() and len(raw_value) <= 7):
                    return None
                environ["CONTENT_LENGTH"] = value
            elif name == b"content-type":
                environ["CONTENT_TYPE"] = value
            elif name == b"connection":
                if raw_value.lower() != b"keep-alive":
                    return None
            else:
                key = "HTTP_" + raw_name.decode("latin-1").upper().replace("-", "_")
                if key in environ:
                    environ[key] += "," + value  # RFC 9110 §5.3, as the bridge joins them
                else:
                    environ[key] = value
        if b"content-length" not in seen or b"host" not in seen:
            return None
        return environ

    def _respond(self, status: str, headers: list[tuple[str, str]], payload: bytes) -> None:
        worker = self.worker
        self.req_count += 1
        worker.nr += 1
        if worker.nr >= worker.max_requests:
            self.log.info("Autorestarting worker after current request.")
            worker.alive = False
        keep = worker.alive and self.cfg.keepalive > 0  # keepalive = 0: one request each
        parts = [f"HTTP/1.1 {status}\r\n"]
        parts += [f"{name}: {value}\r\n" for name, value in headers]
        if not any(name.lower() == "content-length" for name, _ in headers):
            parts.append(f"Content-Length: {len(payload)}\r\n")  # our apps set it; a guard
        if not keep:
            parts.append("Connection: close\r\n")
        head = "".join(parts).encode("latin-1")
        self._safe_write(
            head
            + gunicorn_protocol._CACHED_SERVER_HEADER
            + gunicorn_protocol._get_cached_date_header()
            + b"\r\n"
            + payload
        )
        if not keep:
            self._close_transport()
            return
        # The idle timeout: one timer per connection, moved on only when it fires (see
        # _keepalive_timeout), instead of a timer cancelled and made again per request.
        self._last_active = worker.loop.time()
        if self._keepalive_handle is None:
            self._arm_keepalive_timer()

    def _arm_keepalive_timer(self) -> None:
        super()._arm_keepalive_timer()
        # gunicorn's loop calls this last, once it has answered a request, reset its parser and
        # cleared the request: nothing of the connection is left in its state (bytes that came
        # while it served the request are gone: gunicorn 26 does not keep them), so the
        # connection's next read may be the fast path's again.
        if (
            self._fast_allowed
            and not self._fast
            and not self._closed
            and self._current_request is None
            and not self._request_ready.is_set()
        ):
            self._fast = True
            self._last_active = self.worker.loop.time()

    def _keepalive_timeout(self) -> None:
        idle = self.worker.loop.time() - self._last_active
        keepalive = self.cfg.keepalive
        if self._fast and idle < keepalive:
            self._keepalive_handle = self.worker.loop.call_later(
                keepalive - idle, self._keepalive_timeout
            )
            return
        super()._keepalive_timeout()
