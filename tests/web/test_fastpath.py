"""The fast path of ``POST /token`` (sidecar/web/fastpath.py).

Which requests it takes is tested on the protocol's own classification; that every request, of
the fast shape or not, gets the same answer as before is tested over raw sockets against a real
``sidecar serve`` (gunicorn, the default asyncio worker, no access log: the fast path on).
"""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlencode

import pytest

from sidecar.server import DEFAULT_GUNICORN_CONFIG
from sidecar.web.fastpath import MAX_HEADERS, FastTokenProtocol
from tests.conftest import ACCESS_TOKEN_TYPE, CODE_SEARCH, GATEWAY_SECRET, TOKEN_EXCHANGE
from tests.test_server import Gunicorn, start_gunicorn

BASIC = "Basic " + base64.b64encode(f"gateway:{GATEWAY_SECRET}".encode()).decode()
FORM = "application/x-www-form-urlencoded"


class Classifier:
    """Just what FastTokenProtocol._environ reads of its connection."""

    _base_environ: ClassVar[dict[str, Any]] = {"REQUEST_METHOD": "POST", "PATH_INFO": "/token"}
    _max_headers = MAX_HEADERS
    _max_field = 8190  # gunicorn's default limit_request_field_size

    def environ(self, head: bytes) -> dict[str, Any] | None:
        return FastTokenProtocol._environ(self, head)  # type: ignore[arg-type]


def head(*lines: str) -> bytes:
    return "\r\n".join(lines).encode("latin-1")


PLAIN = ("Host: sidecar", f"Authorization: {BASIC}", f"Content-Type: {FORM}", "Content-Length: 10")


def test_a_plain_request_is_taken_with_its_headers_in_the_environ() -> None:
    environ = Classifier().environ(head(*PLAIN, "User-Agent: gw/1", "X-Trace: a", "x-trace: b"))
    assert environ is not None
    assert environ["CONTENT_LENGTH"] == "10"
    assert environ["CONTENT_TYPE"] == FORM
    assert environ["HTTP_AUTHORIZATION"] == BASIC
    assert environ["HTTP_HOST"] == "sidecar"
    assert environ["HTTP_USER_AGENT"] == "gw/1"
    assert environ["HTTP_X_TRACE"] == "a,b"  # repeated: joined, as the bridge does
    assert "HTTP_CONTENT_LENGTH" not in environ


def test_a_header_line_just_under_the_limit_is_taken() -> None:
    # gunicorn counts a line with its CRLF against limit_request_field_size (8190).
    assert Classifier().environ(head(*PLAIN, "X-Long: " + "v" * 8180)) is not None


def test_keep_alive_and_optional_whitespace_are_taken() -> None:
    environ = Classifier().environ(head(*PLAIN, "Connection: Keep-Alive", "Accept:\t*/* "))
    assert environ is not None
    assert environ["HTTP_ACCEPT"] == "*/*"


@pytest.mark.parametrize(
    "lines",
    [
        pytest.param(PLAIN[1:], id="no Host"),
        pytest.param(PLAIN[:3], id="no Content-Length"),
        pytest.param((*PLAIN, "Content-Length: 10"), id="two Content-Length"),
        pytest.param((*PLAIN, "Authorization: Basic eA=="), id="two Authorization"),
        pytest.param((*PLAIN, "Content-Type: text/plain"), id="two Content-Type"),
        pytest.param((*PLAIN, "Host: other"), id="two Host"),
        pytest.param((*PLAIN, "Transfer-Encoding: chunked"), id="Transfer-Encoding"),
        pytest.param((*PLAIN, "Expect: 100-continue"), id="Expect"),
        pytest.param((*PLAIN, "Upgrade: h2c"), id="Upgrade"),
        pytest.param((*PLAIN, "HTTP2-Settings: AAA"), id="HTTP2-Settings"),
        pytest.param((*PLAIN, "Connection: close"), id="Connection close"),
        pytest.param((*PLAIN, "Connection: keep-alive, Upgrade"), id="Connection list"),
        pytest.param((*PLAIN[:3], "Content-Length: +10"), id="signed length"),
        pytest.param((*PLAIN[:3], "Content-Length: 12345678"), id="8-digit length"),
        pytest.param((*PLAIN[:3], "Content-Length: \u00b9\u00b2"), id="superscript digits"),
        pytest.param((*PLAIN, " folded"), id="obs-fold"),
        pytest.param((*PLAIN, "Bad Name: x"), id="space in a name"),
        pytest.param((*PLAIN, "X-A : x"), id="space before the colon"),
        pytest.param((*PLAIN, "X-A: a\x00b"), id="NUL in a value"),
        pytest.param((*PLAIN, "X-A: a\rb"), id="CR in a value"),
        pytest.param((*PLAIN, "X-A: a\nb"), id="bare LF"),
        pytest.param((*PLAIN, "no colon"), id="no colon"),
        pytest.param((*PLAIN, ""), id="empty line"),
        pytest.param((*PLAIN, *(f"X-{n}: v" for n in range(MAX_HEADERS))), id="too many headers"),
    ],
)
def test_anything_else_goes_to_gunicorn(lines: tuple[str, ...]) -> None:
    assert Classifier().environ(head(*lines)) is None


# --- end to end: sidecar serve ------------------------------------------------------------------


def warm(server: Gunicorn) -> None:
    """A first exchange in each worker: its first load of the policies and keys would wait, so
    that request (and its connection) goes to gunicorn's path and a thread. Connections held
    open at once: a new one goes to the worker holding the fewest, so each worker gets some."""
    connections = []
    try:
        for _ in range(4):
            connections.append(Connection(server))
            time.sleep(0.05)  # the accepting worker counts it before the next one arrives
        for connection in connections:
            connection.send(request(form(server), f"Authorization: {BASIC}"))
            assert connection.response()[0] == 200
    finally:
        for connection in connections:
            connection.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    server = start_gunicorn(tmp_path_factory.mktemp("fastpath"), access_log=False)
    try:
        warm(server)
        yield server
    finally:
        server.kill()


def form(server: Gunicorn, **overrides: str | None) -> bytes:
    params: dict[str, str | None] = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": server.idp.token(),
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "audience": CODE_SEARCH,
        **overrides,
    }
    return urlencode({k: v for k, v in params.items() if v is not None}).encode()


def request(body: bytes, *headers: str, target: str = "/token", version: str = "1.1") -> bytes:
    lines = [
        f"POST {target} HTTP/{version}",
        "Host: 127.0.0.1",
        f"Content-Type: {FORM}",
        f"Content-Length: {len(body)}",
        *headers,
    ]
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


class Connection:
    """One raw keep-alive connection; responses are read by their Content-Length."""

    def __init__(self, server: Gunicorn) -> None:
        host, port = server.url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.buffer = b""
        self.raw_names: list[str] = []  # the header names of the last answer, as sent

    @property
    def answered_by_fast_path(self) -> bool:
        # The fast path writes the app's header names as they are; gunicorn's ASGI path, through
        # the bridge, lower-cases them (ASGI headers are lower-case).
        return "Content-Type" in self.raw_names

    def close(self) -> None:
        self.sock.close()

    def send(self, *chunks: bytes, pause: float = 0.0) -> None:
        for chunk in chunks:
            self.sock.sendall(chunk)
            if pause:
                time.sleep(pause)

    def response(self) -> tuple[int, dict[str, str], dict[str, Any]]:
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        raw_head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = raw_head.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        self.raw_names = []
        for line in lines:
            name, _, value = line.partition(":")
            self.raw_names.append(name.strip())
            headers[name.strip().lower()] = value.strip()
        length = int(headers["content-length"])
        while len(self.buffer) < length:
            self._read()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), headers, json.loads(body)

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def _read(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the server")
        self.buffer += chunk


@pytest.fixture
def connection(served: Gunicorn) -> Iterator[Connection]:
    opened = Connection(served)
    yield opened
    opened.close()


def assert_no_store(headers: dict[str, str]) -> None:
    assert headers["cache-control"] == "no-store"
    assert headers["pragma"] == "no-cache"
    assert headers["content-type"] == "application/json"
    assert "date" in headers


def test_exchanges_on_one_kept_alive_connection(served: Gunicorn, connection: Connection) -> None:
    for _ in range(3):
        connection.send(request(form(served), f"Authorization: {BASIC}"))
        status, headers, body = connection.response()
        assert status == 200, body
        assert_no_store(headers)
        assert body["token_type"] == "Bearer"
        assert body["issued_token_type"] == ACCESS_TOKEN_TYPE
        assert "connection" not in headers
        assert connection.answered_by_fast_path


def test_refusals_on_the_fast_path_are_oauth_errors(
    served: Gunicorn, connection: Connection
) -> None:
    cases = [
        ((f"Authorization: Basic {base64.b64encode(b'gateway:wrong').decode()}",), {}, 401),
        ((f"Authorization: {BASIC}",), {"grant_type": "password"}, 400),
        ((f"Authorization: {BASIC}",), {"subject_token": "not.a.jwt"}, 400),
        ((f"Authorization: {BASIC}",), {"audience": "https://unknown.internal"}, 400),
    ]
    errors = []
    for headers, overrides, status in cases:
        connection.send(request(form(served, **overrides), *headers))
        got, response_headers, body = connection.response()
        assert got == status, body
        assert_no_store(response_headers)
        assert connection.answered_by_fast_path
        errors.append(body["error"])
    assert errors == [
        "invalid_client",
        "unsupported_grant_type",
        "invalid_request",
        "invalid_target",
    ]


@pytest.mark.parametrize(
    ("extra", "split"),
    [
        pytest.param((), True, id="headers and body in two reads"),
        pytest.param(("Expect: 100-continue",), False, id="Expect"),
    ],
)
def test_requests_of_other_shapes_are_answered_the_same(
    served: Gunicorn, connection: Connection, extra: tuple[str, ...], split: bool
) -> None:
    raw = request(form(served), f"Authorization: {BASIC}", *extra)
    if split:
        cut = raw.index(b"\r\n\r\n") + 4
        connection.send(raw[:cut], raw[cut:], pause=0.05)
    else:
        connection.send(raw)
    while b"\r\n\r\n" not in connection.buffer:
        connection._read()
    if connection.buffer.startswith(b"HTTP/1.1 100 "):  # an interim answer to Expect, if any
        connection.buffer = connection.buffer.partition(b"\r\n\r\n")[2]
    status, headers, body = connection.response()
    assert status == 200, body
    assert_no_store(headers)
    assert not connection.answered_by_fast_path
    # Once gunicorn has answered it, the connection's next request is the fast path's again.
    connection.send(request(form(served), f"Authorization: {BASIC}"))
    assert connection.response()[0] == 200
    assert connection.answered_by_fast_path


def test_a_first_exchange_that_waits_then_the_fast_path(tmp_path: Path) -> None:
    # A worker's first exchange waits for its first load of policies and keys: it is answered
    # on a thread through gunicorn's path; the same connection's next one takes the fast path.
    server = start_gunicorn(tmp_path, access_log=False)
    connection = Connection(server)
    try:
        answered_by = []
        for _ in range(2):
            connection.send(request(form(server), f"Authorization: {BASIC}"))
            assert connection.response()[0] == 200
            answered_by.append(connection.answered_by_fast_path)
        assert answered_by == [False, True]
    finally:
        connection.close()
        server.kill()


def test_pipelined_requests_are_answered_in_order(served: Gunicorn, connection: Connection) -> None:
    good = request(form(served), f"Authorization: {BASIC}")
    bad = request(form(served, grant_type="password"), f"Authorization: {BASIC}")
    connection.send(good + bad + good)
    assert [connection.response()[0] for _ in range(3)] == [200, 400, 200]
    assert connection.answered_by_fast_path


def test_connection_close_is_honoured(served: Gunicorn, connection: Connection) -> None:
    connection.send(request(form(served), f"Authorization: {BASIC}", "Connection: close"))
    assert connection.response()[0] == 200
    assert connection.closed_by_server()


def test_a_query_string_is_refused(served: Gunicorn, connection: Connection) -> None:
    connection.send(request(form(served), f"Authorization: {BASIC}", target="/token?scope=x"))
    status, headers, body = connection.response()
    assert (status, body["error"]) == (400, "invalid_request")
    assert_no_store(headers)


def test_a_chunked_body_is_answered(served: Gunicorn, connection: Connection) -> None:
    body = form(served)
    raw = (
        b"POST /token HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + f"Content-Type: {FORM}\r\nAuthorization: {BASIC}\r\n".encode()
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n"
    )
    connection.send(raw)
    status, _, answer = connection.response()
    # /token needs a Content-Length (DESIGN: size caps before parsing).
    assert (status, answer["error"]) == (400, "invalid_request")


def test_a_body_shorter_than_its_length_is_not_answered_early(
    served: Gunicorn, connection: Connection
) -> None:
    raw = request(form(served), f"Authorization: {BASIC}")
    connection.send(raw[:-5])
    connection.sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        connection.sock.recv(1)  # waits for the rest, as gunicorn does
    connection.sock.settimeout(10)
    connection.send(raw[-5:])
    assert connection.response()[0] == 200


def test_the_audit_log_records_fast_path_exchanges_by_jti_only(
    served: Gunicorn, connection: Connection
) -> None:
    subject = served.idp.token()
    connection.send(request(form(served, subject_token=subject), f"Authorization: {BASIC}"))
    status, _, body = connection.response()
    assert status == 200
    token = body["access_token"]
    payload = token.split(".")[1]
    jti = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]
    deadline = time.monotonic() + 5
    while f'"jti":"{jti}"' not in served.log():
        assert time.monotonic() < deadline, "the grant never reached the sidecar.audit log"
        time.sleep(0.05)
    log = served.log()
    assert token not in log
    assert subject not in log


# --- keep-alive settings ------------------------------------------------------------------------


def start_with(tmp_path: Path, settings: str) -> Gunicorn:
    """`sidecar serve` with deploy/gunicorn.conf.py plus ``settings``."""
    config = tmp_path / "gunicorn.conf.py"
    config.write_text(
        f"import runpy\nglobals().update(runpy.run_path({str(DEFAULT_GUNICORN_CONFIG)!r}))\n"
        + settings
    )
    return start_gunicorn(tmp_path, "--gunicorn-config", str(config), access_log=False)


def test_a_request_handed_to_gunicorn_is_not_cut_by_the_fast_paths_idle_timer(
    tmp_path: Path,
) -> None:
    server = start_with(tmp_path, "keepalive = 1\n")
    warm(server)
    connection = Connection(server)
    try:
        for _ in range(2):
            connection.send(request(form(server), f"Authorization: {BASIC}"))
            assert connection.response()[0] == 200
            assert connection.answered_by_fast_path
        time.sleep(0.5)
        raw = request(form(server), f"Authorization: {BASIC}")
        cut = raw.index(b"\r\n\r\n") + 4
        # The headers now (gunicorn's path: the body is not there yet), the body after the
        # fast path's idle timer (1 s after its last answer) would have run out.
        connection.send(raw[:cut], raw[cut:], pause=0.8)
        assert connection.response()[0] == 200
        assert not connection.answered_by_fast_path
    finally:
        connection.close()
        server.kill()


def test_keepalive_0_closes_each_connection_after_its_answer(tmp_path: Path) -> None:
    server = start_with(tmp_path, "keepalive = 0\n")
    warm(server)
    connection = Connection(server)
    try:
        connection.send(request(form(server), f"Authorization: {BASIC}"))
        status, headers, _ = connection.response()
        assert status == 200
        assert connection.answered_by_fast_path
        assert headers.get("connection") == "close"
        assert connection.closed_by_server()
    finally:
        connection.close()
        server.kill()
