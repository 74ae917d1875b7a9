"""The ASGI bridge (sidecar/web/asgi.py): which thread answers, the WSGI environ it builds, and its
last-resort error. Driven as gunicorn's asyncio worker drives it (scope, receive, send), over WSGI
apps that record what they were given; the real app under the real worker is exercised by every
test that starts `sidecar serve` (the default worker class)."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlencode

import pytest

from sidecar.audit import AuditTrail
from sidecar.blocking import WouldBlock, may_block
from sidecar.exchange.request import MAX_BODY_BYTES
from sidecar.services import Services
from sidecar.web.app import create_app
from sidecar.web.asgi import AsgiBridge, wsgi_environ
from sidecar.web.token import RETRIED_ON_THREAD
from tests.conftest import GATEWAY_SECRET, audit_rows
from tests.web.helpers import exchange_form

FORM = b"grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&subject_token=x"


class Recorder:
    """A WSGI app: answers 200 and records each call's environ, body and thread."""

    def __init__(self, behaviour: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.calls: list[tuple[dict[str, Any], bytes, str]] = []
        self.behaviour = behaviour

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        body = environ["wsgi.input"].read()
        self.calls.append((environ, body, threading.current_thread().name))
        if self.behaviour is not None:
            self.behaviour(environ)
        start_response("200 OK", [("Content-Type", "application/json"), ("X-Seen", "yes")])
        return [b'{"ok":', b"true}"]


def scope(
    path: str = "/token",
    method: str = "POST",
    headers: list[tuple[bytes, bytes]] | None = None,
    server: tuple[str, int | None] = ("127.0.0.1", 8080),
) -> dict[str, Any]:
    return {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers
        or [
            (b"host", b"attacker.example:9999"),
            (b"content-type", b"application/x-www-form-urlencoded"),
        ],
        "server": server,
        "client": ("127.0.0.1", 50000),
    }


def serve(
    bridge: AsgiBridge, request_scope: dict[str, Any], chunks: list[bytes]
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One request through the bridge, its body sent in ``chunks``; the response."""
    sent: list[dict[str, Any]] = []
    messages = [
        {"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}
        for index, chunk in enumerate(chunks)
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(bridge(request_scope, receive, send))
    start, body = sent
    assert start["type"] == "http.response.start"
    return start["status"], dict(start["headers"]), body["body"]


@pytest.fixture
def loop_thread() -> str:
    return threading.current_thread().name  # asyncio.run runs the loop on this thread


def test_token_requests_are_answered_on_the_event_loop_thread(loop_thread: str) -> None:
    app = Recorder()
    status, headers, body = serve(AsgiBridge(app), scope(), [FORM])

    assert (status, body) == (200, b'{"ok":true}')
    assert headers[b"x-seen"] == b"yes"
    environ, received, thread = app.calls[0]
    assert thread == loop_thread
    assert received == FORM
    assert RETRIED_ON_THREAD not in environ


def test_other_paths_are_answered_on_the_pool(loop_thread: str) -> None:
    app = Recorder()
    serve(AsgiBridge(app), scope("/.well-known/jwks.json", "GET"), [b""])

    assert app.calls[0][2] != loop_thread
    assert app.calls[0][2].startswith("wsgi")


def test_a_client_assertion_is_never_tried_on_the_event_loop(loop_thread: str) -> None:
    app = Recorder()
    serve(AsgiBridge(app), scope(), [FORM + b"&client_assertion=eyJ"])

    assert len(app.calls) == 1
    assert app.calls[0][2] != loop_thread
    assert app.calls[0][0][RETRIED_ON_THREAD] is True


def test_a_request_the_fast_path_tried_goes_straight_to_a_thread_once(loop_thread: str) -> None:
    # The fast path (sidecar/web/fastpath.py) tried it on the loop and it would have waited: not
    # tried on the loop a second time (its rate-limit token is not taken twice).
    app = Recorder()
    bridge = AsgiBridge(app)
    bridge.tried_on_loop(("127.0.0.1", 50000))
    serve(bridge, scope(), [FORM])
    serve(bridge, scope(), [FORM])  # the next request of that connection: the loop again

    (first, _, first_thread), (second, _, second_thread) = app.calls
    assert first_thread != loop_thread
    assert first[RETRIED_ON_THREAD] is True
    assert second_thread == loop_thread
    assert RETRIED_ON_THREAD not in second


def test_a_closed_connection_is_forgotten(loop_thread: str) -> None:
    app = Recorder()
    bridge = AsgiBridge(app)
    bridge.tried_on_loop(("127.0.0.1", 50000))
    bridge.forget(("127.0.0.1", 50000))
    serve(bridge, scope(), [FORM])
    assert app.calls[0][2] == loop_thread


def test_an_exchange_that_would_wait_is_answered_again_on_a_thread(loop_thread: str) -> None:
    app = Recorder(lambda environ: may_block())
    status, _, _ = serve(AsgiBridge(app), scope(), [FORM])

    assert status == 200
    (_, first_body, first_thread), (second, second_body, second_thread) = app.calls
    assert first_thread == loop_thread
    assert second_thread != loop_thread  # where may_block() does not raise
    assert first_body == second_body == FORM  # the body is given again, whole
    assert second[RETRIED_ON_THREAD] is True


def test_an_unexpected_exception_is_a_bare_server_error() -> None:
    def explode(environ: dict[str, Any]) -> None:
        raise RuntimeError("secret-detail")

    status, headers, body = serve(AsgiBridge(Recorder(explode)), scope(), [FORM])

    assert status == 500
    assert json.loads(body)["error"] == "server_error"
    assert b"secret-detail" not in body
    assert headers[b"cache-control"] == b"no-store"


def test_an_app_that_never_starts_a_response_is_a_bare_server_error() -> None:
    def silent(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        return [b"no status"]

    status, headers, body = serve(AsgiBridge(silent), scope(), [FORM])

    assert status == 500
    assert json.loads(body)["error"] == "server_error"
    assert headers[b"content-length"] == str(len(body)).encode()


def test_would_block_leaving_the_app_on_a_thread_is_not_retried_for_ever() -> None:
    def always(environ: dict[str, Any]) -> None:
        raise WouldBlock

    status, _, body = serve(AsgiBridge(Recorder(always)), scope(), [FORM])

    assert status == 500  # on the pool WouldBlock is a bug, answered as one
    assert json.loads(body)["error"] == "server_error"


def test_a_body_in_chunks_is_joined() -> None:
    app = Recorder()
    serve(AsgiBridge(app), scope(), [FORM[:10], FORM[10:30], FORM[30:]])

    assert app.calls[0][1] == FORM


def test_a_body_over_the_cap_is_cut_one_byte_past_it() -> None:
    app = Recorder()
    chunk = b"a" * 4096
    serve(AsgiBridge(app), scope(), [chunk] * (MAX_BODY_BYTES // 4096 + 3))

    assert len(app.calls[0][1]) == MAX_BODY_BYTES + 1


def test_environ_takes_the_server_address_from_the_socket_not_the_host_header() -> None:
    environ = wsgi_environ(scope(server=("127.0.0.1", 8081)), b"")

    assert environ["SERVER_NAME"] == "127.0.0.1"
    assert environ["SERVER_PORT"] == "8081"
    assert environ["HTTP_HOST"] == "attacker.example:9999"


def test_environ_of_a_unix_socket_has_no_port() -> None:
    assert wsgi_environ(scope(server=("/run/sidecar.sock", None)), b"")["SERVER_PORT"] == ""


def test_environ_maps_content_headers_and_joins_repeated_ones() -> None:
    environ = wsgi_environ(
        scope(
            headers=[
                (b"content-type", b"application/x-www-form-urlencoded"),
                (b"content-length", b"5"),
                (b"content-length", b"6"),
                (b"x-trace", b"a"),
                (b"x-trace", b"b"),
            ]
        ),
        b"hello",
    )

    assert environ["CONTENT_TYPE"] == "application/x-www-form-urlencoded"
    assert environ["CONTENT_LENGTH"] == "5,6"  # not digits: /token refuses it
    assert environ["HTTP_X_TRACE"] == "a,b"
    assert environ["wsgi.input"].read() == b"hello"


def test_lifespan_startup_and_shutdown_complete() -> None:
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    asyncio.run(AsgiBridge(Recorder())({"type": "lifespan"}, receive, send))
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def test_a_refusal_past_the_audit_high_water_mark_is_answered_on_a_thread_and_recorded(
    services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    # Every record past high_water=0 would wait for the writer: on the loop, WouldBlock.
    services.audit = AuditTrail(services.engine, flush_interval=0.01, high_water=0)
    bridge = AsgiBridge(create_app(services.settings, services))
    form = urlencode(exchange_form("not-a-jwt")).encode()
    credentials = base64.b64encode(f"gateway:{GATEWAY_SECRET}".encode())
    headers = [
        (b"content-type", b"application/x-www-form-urlencoded"),
        (b"authorization", b"Basic " + credentials),
        (b"content-length", str(len(form)).encode()),
    ]

    status, _, body = serve(bridge, scope(headers=headers), [form])

    assert (status, json.loads(body)["error"]) == (400, "invalid_request")
    rows = audit_rows(services)
    assert [(row.decision, row.error, row.client_id) for row in rows] == [
        ("denied", "invalid_request", "gateway")
    ]
    assert "WouldBlock" not in caplog.text
