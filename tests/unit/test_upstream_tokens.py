"""Tokens from an upstream's own authorization server (sidecar/upstream_tokens.py), against a
scripted authorization server served over real HTTP on loopback: the client credentials form
and authentication sent, the cache, single-flight, retries with backoff, and that every failure
is a 503 whose audit reason leaks no secret, token or upstream error description."""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import pytest
import requests

from sidecar import upstream_tokens
from sidecar.errors import TemporarilyUnavailableError
from sidecar.upstream_tokens import (
    ClientCredentialsSettings,
    ClientCredentialsSource,
    UpstreamToken,
)
from tests.conftest import FakeClock

SECRET = "upstream:secret/+ é%&=" + "x" * 16
TICKETS = "https://tickets.internal/mcp"
CODE_SEARCH = "https://code-search.internal/mcp"


@dataclass
class Reply:
    """What the fake authorization server answers: ``body`` as JSON (a str as it is; None: a
    fresh token), after ``delay`` seconds."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Received:
    form: dict[str, list[str]]
    headers: dict[str, str]


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up before the answer (the timeout tests): nothing to report


class AuthorizationServer:
    """Records each token request and answers with the next scripted reply; once the script is
    used up, a Bearer token ``upstream-token-<n>`` that expires in 600 s."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.replies: list[Reply] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()  # ends scripted delays, so no handler outlives a test
        self.server = QuietServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}/token"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def stop(self) -> None:
        self._stopped.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def _answer(self, received: Received) -> tuple[Reply, bytes]:
        with self._lock:
            self.received.append(received)
            number = len(self.received)
            reply = self.replies.pop(0) if self.replies else Reply()
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self._stopped.wait(reply.delay)
        finally:
            with self._lock:
                self.active -= 1
        body = token_body(f"upstream-token-{number}") if reply.body is None else reply.body
        return reply, body.encode() if isinstance(body, str) else json.dumps(body).encode()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = parse_qs(self.rfile.read(length).decode(), keep_blank_values=True)
                reply, raw = owner._answer(Received(form, dict(self.headers.items())))
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(raw)
                except OSError:  # the client gave up (timeout tests)
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def token_body(access_token: str = "upstream-token", **members: Any) -> dict[str, Any]:
    body = {"access_token": access_token, "token_type": "Bearer", "expires_in": 600}
    body.update(members)
    return {name: value for name, value in body.items() if value is not None}


def oauth_error(status: int, error: str, description: str, **headers: str) -> Reply:
    return Reply(status, {"error": error, "error_description": description}, headers)


@pytest.fixture
def server() -> Iterator[AuthorizationServer]:
    served = AuthorizationServer()
    yield served
    served.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def make_source(
    server: AuthorizationServer, clock: FakeClock, sleeps: list[float]
) -> Iterator[Callable[..., ClientCredentialsSource]]:
    """Builds a source for the fake server (settings overridable) that records its sleeps."""
    built: list[ClientCredentialsSource] = []

    def make(**overrides: Any) -> ClientCredentialsSource:
        settings = ClientCredentialsSettings(
            **{
                "name": "tickets",
                "token_url": server.url,
                "client_id": "sidecar:tickets",
                "client_secret": SECRET,
                "timeout": 5.0,
                "retries": 2,
                "failure_memory": 0.0,  # the tests of remembered failures set their own
                **overrides,
            }
        )
        source = ClientCredentialsSource(settings, clock=clock, sleep=sleeps.append)
        built.append(source)
        return source

    yield make
    for source in built:
        source.close()


@pytest.fixture
def source(make_source: Callable[..., ClientCredentialsSource]) -> ClientCredentialsSource:
    return make_source()


def in_threads(count: int, call: Callable[[], Any]) -> list[Any]:
    """``call`` in ``count`` threads released together: each one's result or exception."""
    start = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        start.wait()
        try:
            results[index] = call()
        except Exception as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return results


def failure(call: Callable[[], Any]) -> TemporarilyUnavailableError:
    with pytest.raises(TemporarilyUnavailableError) as raised:
        call()
    error = raised.value
    # The client is told only the generic 503; the precise cause is the audit reason.
    assert error.status_code == 503
    assert error.error == "temporarily_unavailable"
    assert error.description == TemporarilyUnavailableError.description
    return error


def texts_of(error: BaseException) -> list[str]:
    """str and repr of an error and of every error chained to it."""
    texts: list[str] = []
    current: BaseException | None = error
    while current is not None:
        texts += [str(current), repr(current), str(getattr(current, "reason", ""))]
        current = current.__cause__ or current.__context__
    return texts


# --- the request ------------------------------------------------------------------------------


def test_the_form_and_basic_authentication_are_sent(
    source: ClientCredentialsSource, server: AuthorizationServer
) -> None:
    token = source.token(("tickets.read", "tickets.write"), TICKETS)

    (received,) = server.received
    assert received.form == {
        "grant_type": ["client_credentials"],
        "scope": ["tickets.read tickets.write"],
        "resource": [TICKETS],
    }
    # RFC 6749 §2.3.1: each of id and secret is form-urlencoded, then the pair base64-encoded.
    pair = b"sidecar%3Atickets:upstream%3Asecret%2F%2B%20%C3%A9%25%26%3D" + b"x" * 16
    assert received.headers["Authorization"] == "Basic " + base64.b64encode(pair).decode()
    assert received.headers["Accept"] == "application/json"
    assert token == UpstreamToken("upstream-token-1", "Bearer", 1600.0, None)


def test_client_secret_post_sends_the_credentials_in_the_form(
    make_source: Callable[..., ClientCredentialsSource], server: AuthorizationServer
) -> None:
    make_source(auth_method="client_secret_post").token(("tickets.read",), TICKETS)

    (received,) = server.received
    assert received.form["client_id"] == ["sidecar:tickets"]
    assert received.form["client_secret"] == [SECRET]
    assert "Authorization" not in received.headers


def test_the_target_can_be_sent_as_audience(
    make_source: Callable[..., ClientCredentialsSource], server: AuthorizationServer
) -> None:
    make_source(audience_parameter="audience").token((), TICKETS)

    assert server.received[0].form == {"grant_type": ["client_credentials"], "audience": [TICKETS]}


def test_the_target_can_be_left_out(
    make_source: Callable[..., ClientCredentialsSource], server: AuthorizationServer
) -> None:
    make_source(audience_parameter="none").token(("tickets.read",), TICKETS)

    assert server.received[0].form == {
        "grant_type": ["client_credentials"],
        "scope": ["tickets.read"],
    }


def test_no_target_and_no_scopes_send_the_bare_grant(
    source: ClientCredentialsSource, server: AuthorizationServer
) -> None:
    source.token((), None)

    assert server.received[0].form == {"grant_type": ["client_credentials"]}


def test_the_granted_scope_is_returned(
    source: ClientCredentialsSource, server: AuthorizationServer
) -> None:
    server.replies = [Reply(body=token_body(scope="tickets.read"))]

    assert source.token(("tickets.read", "tickets.write"), TICKETS).scope == "tickets.read"


@pytest.mark.parametrize(
    "url",
    [
        "http://tickets-as.example/token",
        "http://10.0.0.1/token",
        "ftp://127.0.0.1/token",
        "https:///token",
        "https://user:pass@tickets-as.example/token",
    ],
)
def test_a_token_url_that_is_not_https_or_loopback_http_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="upstream tickets"):
        ClientCredentialsSettings("tickets", url, "sidecar", SECRET)


@pytest.mark.parametrize(
    "url", ["https://tickets-as.example/token", "http://localhost:8080/t", "http://[::1]:80/t"]
)
def test_https_and_loopback_http_token_urls_are_accepted(url: str) -> None:
    ClientCredentialsSource(ClientCredentialsSettings("tickets", url, "sidecar", SECRET)).close()


@pytest.mark.parametrize(
    "overrides",
    [
        {"auth_method": "private_key_jwt"},
        {"audience_parameter": "target"},
        {"client_secret": ""},
        {"timeout": 0},
        {"retries": -1},
    ],
)
def test_unusable_settings_are_refused(overrides: dict[str, Any]) -> None:
    values = {"name": "tickets", "token_url": "https://as.example/token", "client_id": "sidecar"}
    with pytest.raises(ValueError, match="upstream tickets"):
        ClientCredentialsSettings(**{**values, "client_secret": SECRET, **overrides})


# --- the cache --------------------------------------------------------------------------------


def test_a_repeated_request_is_served_from_the_cache(
    source: ClientCredentialsSource, server: AuthorizationServer
) -> None:
    first = source.token(("tickets.read",), TICKETS)

    assert source.token(("tickets.read",), TICKETS) is first
    assert server.count == 1


def test_the_order_of_the_scopes_is_no_key(
    source: ClientCredentialsSource, server: AuthorizationServer
) -> None:
    source.token(("b", "a"), TICKETS)
    source.token(("a", "b", "a"), TICKETS)

    assert server.count == 1
    assert server.received[0].form["scope"] == ["a b"]


def test_a_different_scope_is_fetched_again(
    source: ClientCredentialsSource, server: AuthorizationServer
) -> None:
    source.token(("tickets.read",), TICKETS)
    source.token(("tickets.write",), TICKETS)

    assert server.count == 2


def test_a_different_target_is_fetched_again(
    source: ClientCredentialsSource, server: AuthorizationServer
) -> None:
    source.token(("read",), TICKETS)
    source.token(("read",), CODE_SEARCH)

    assert server.count == 2


def test_a_token_is_used_until_the_margin_before_it_expires(
    source: ClientCredentialsSource, server: AuthorizationServer, clock: FakeClock
) -> None:
    first = source.token((), TICKETS)  # expires at 1600; margin 30 s
    clock.now = 1569.9
    assert source.token((), TICKETS) is first

    clock.now = 1570.0
    second = source.token((), TICKETS)

    assert second.access_token == "upstream-token-2"
    assert second.expires_at == 2170.0
    assert server.count == 2


def test_a_short_lived_token_is_refreshed_at_a_tenth_of_its_lifetime_before_expiry(
    source: ClientCredentialsSource, server: AuthorizationServer, clock: FakeClock
) -> None:
    server.replies = [Reply(body=token_body(expires_in=60))]
    first = source.token((), TICKETS)  # min(30 s, 6 s) before 1060
    clock.now = 1053.9
    assert source.token((), TICKETS) is first

    clock.now = 1054.0
    source.token((), TICKETS)

    assert server.count == 2


def test_a_token_without_expires_in_lives_60_seconds_with_one_warning(
    source: ClientCredentialsSource,
    server: AuthorizationServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server.replies = [Reply(body=token_body(expires_in=None))] * 2
    with caplog.at_level(logging.WARNING, logger="sidecar.upstream_tokens"):
        token = source.token((), TICKETS)
        source.token((), CODE_SEARCH)

    assert token.expires_at == 1060.0
    assert [r.getMessage() for r in caplog.records] == [
        "upstream tickets: token response has no expires_in; assuming 60 s"
    ]


def test_the_cache_keeps_the_most_recently_used_entries(
    make_source: Callable[..., ClientCredentialsSource], server: AuthorizationServer
) -> None:
    source = make_source(max_entries=2)
    source.token(("a",), TICKETS)
    source.token(("b",), TICKETS)
    source.token(("a",), TICKETS)  # "a" is now the most recently used
    source.token(("c",), TICKETS)  # evicts "b"
    assert server.count == 3

    source.token(("a",), TICKETS)
    source.token(("b",), TICKETS)

    assert server.count == 4


def test_clear_empties_the_cache(
    source: ClientCredentialsSource, server: AuthorizationServer
) -> None:
    source.token((), TICKETS)
    source.clear()
    source.token((), TICKETS)

    assert server.count == 2


def test_a_failure_is_not_cached(
    source: ClientCredentialsSource, server: AuthorizationServer
) -> None:
    server.replies = [oauth_error(400, "invalid_scope", "no such scope")]
    failure(lambda: source.token(("tickets.admin",), TICKETS))

    token = source.token(("tickets.admin",), TICKETS)

    assert token.access_token == "upstream-token-2"
    assert server.count == 2


def test_closing_leaves_a_session_the_caller_passed_in_open(server: AuthorizationServer) -> None:
    session = requests.Session()
    settings = ClientCredentialsSettings("tickets", server.url, "sidecar", SECRET)
    ClientCredentialsSource(settings, session=session).close()

    assert session.post(server.url, data={}).status_code == 200
    session.close()


# --- single flight ----------------------------------------------------------------------------


def test_concurrent_requests_for_one_key_share_one_fetch(
    source: ClientCredentialsSource, server: AuthorizationServer
) -> None:
    server.replies = [Reply(delay=0.3)]

    results = in_threads(50, lambda: source.token(("tickets.read",), TICKETS))

    assert server.count == 1
    assert {r.access_token for r in results} == {"upstream-token-1"}


def test_concurrent_requests_for_distinct_keys_fetch_in_parallel(
    source: ClientCredentialsSource, server: AuthorizationServer
) -> None:
    server.replies = [Reply(delay=0.3), Reply(delay=0.3)]
    keys = iter([TICKETS, CODE_SEARCH])
    lock = threading.Lock()

    def call() -> UpstreamToken:
        with lock:
            target = next(keys)
        return source.token((), target)

    results = in_threads(2, call)

    assert server.count == 2
    assert server.max_active == 2
    assert {r.access_token for r in results} == {"upstream-token-1", "upstream-token-2"}


def test_the_error_of_a_fetch_reaches_every_waiter_and_the_next_call_fetches_again(
    source: ClientCredentialsSource, server: AuthorizationServer
) -> None:
    server.replies = [Reply(401, {"error": "invalid_client"}, delay=0.3)]

    results = in_threads(10, lambda: source.token((), TICKETS))

    assert server.count == 1
    assert all(isinstance(r, TemporarilyUnavailableError) for r in results)
    assert {r.reason for r in results} == {
        "upstream tickets: authorization server answered 401 invalid_client"
    }
    assert source.token((), TICKETS).access_token == "upstream-token-2"


def test_a_waiter_gives_up_after_a_bounded_wait(
    server: AuthorizationServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The leader is held in its backoff sleep; the waiter's bound is
    # timeout * (retries + 1) + longest waits (Retry-After honoured up to 0 s here) + 1 s.
    monkeypatch.setattr(upstream_tokens, "MAX_RETRY_AFTER", 0.0)
    server.replies = [Reply(503)]
    release, in_backoff = threading.Event(), threading.Event()

    def held_sleep(_: float) -> None:
        in_backoff.set()
        release.wait(10)

    settings = ClientCredentialsSettings(
        "tickets", server.url, "sidecar", SECRET, timeout=0.1, retries=1, backoff=0.0
    )
    source = ClientCredentialsSource(settings, sleep=held_sleep)
    leader = threading.Thread(target=lambda: source.token((), TICKETS))
    leader.start()
    try:
        assert in_backoff.wait(5)
        error = failure(lambda: source.token((), TICKETS))  # gives up after 1.2 s
    finally:
        release.set()
        leader.join(5)
        source.close()

    assert error.reason == "upstream tickets: gave up waiting for a token request"


# --- retries ----------------------------------------------------------------------------------


def test_a_5xx_is_retried_after_a_backoff(
    source: ClientCredentialsSource, server: AuthorizationServer, sleeps: list[float]
) -> None:
    server.replies = [Reply(503, {"error": "temporarily_unavailable"})]

    token = source.token((), TICKETS)

    assert token.access_token == "upstream-token-2"
    assert server.count == 2
    (slept,) = sleeps
    assert 0.2 <= slept <= 0.3


def test_the_backoff_doubles_with_each_retry(
    source: ClientCredentialsSource, server: AuthorizationServer, sleeps: list[float]
) -> None:
    server.replies = [Reply(500), Reply(502)]

    source.token((), TICKETS)

    assert server.count == 3
    assert 0.2 <= sleeps[0] <= 0.3
    assert 0.4 <= sleeps[1] <= 0.6


def test_a_429_waits_for_its_retry_after(
    source: ClientCredentialsSource, server: AuthorizationServer, sleeps: list[float]
) -> None:
    server.replies = [Reply(429, {}, {"Retry-After": "1"})]

    source.token((), TICKETS)

    assert sleeps == [1.0]
    assert server.count == 2


def test_a_retry_after_longer_than_5_seconds_falls_back_to_the_backoff(
    source: ClientCredentialsSource, server: AuthorizationServer, sleeps: list[float]
) -> None:
    server.replies = [Reply(429, {}, {"Retry-After": "120"})]

    source.token((), TICKETS)

    (slept,) = sleeps
    assert 0.2 <= slept <= 0.3


def test_transient_failures_give_up_after_the_retries(
    source: ClientCredentialsSource, server: AuthorizationServer, sleeps: list[float]
) -> None:
    server.replies = [Reply(503)] * 3

    error = failure(lambda: source.token((), TICKETS))

    assert server.count == 3
    assert len(sleeps) == 2
    assert error.reason == "upstream tickets: authorization server answered 503 (3 attempts)"


def test_a_refused_connection_is_unavailable_after_every_attempt(
    source: ClientCredentialsSource, server: AuthorizationServer, sleeps: list[float]
) -> None:
    server.stop()

    error = failure(lambda: source.token((), TICKETS))

    assert len(sleeps) == 2  # retries=2: three attempts
    assert error.reason == "upstream tickets: unreachable (3 attempts)"


def test_a_slow_authorization_server_times_out(
    make_source: Callable[..., ClientCredentialsSource], server: AuthorizationServer
) -> None:
    server.replies = [Reply(delay=0.6), Reply(delay=0.6)]
    source = make_source(timeout=0.2, retries=1)

    error = failure(lambda: source.token((), TICKETS))

    assert server.count == 2
    assert error.reason == "upstream tickets: timed out (2 attempts)"


def test_a_client_error_is_not_retried_and_its_description_stays_out(
    source: ClientCredentialsSource, server: AuthorizationServer, sleeps: list[float]
) -> None:
    server.replies = [oauth_error(401, "invalid_client", "client sidecar: bad secret " + SECRET)]

    error = failure(lambda: source.token((), TICKETS))

    assert server.count == 1
    assert sleeps == []
    assert error.reason == "upstream tickets: authorization server answered 401 invalid_client"
    assert all("bad secret" not in text and SECRET not in text for text in texts_of(error))


def test_an_error_code_that_is_not_a_plain_token_stays_out_of_the_reason(
    source: ClientCredentialsSource, server: AuthorizationServer
) -> None:
    server.replies = [Reply(400, {"error": "invalid scope: tickets.admin <script>"})]

    error = failure(lambda: source.token((), TICKETS))

    assert error.reason == "upstream tickets: authorization server answered 400"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (token_body(token_type=None), "token response has no token_type"),
        (token_body(access_token=""), "token response has no access_token"),
        (token_body(expires_in="abc"), "token response has an unusable expires_in"),
        (token_body(expires_in=0), "token response has an unusable expires_in"),
        (token_body(expires_in=True), "token response has an unusable expires_in"),
        (token_body(scope=["read"]), "token response has an unusable scope"),
        ("<html>upstream-token</html>", "token response is not JSON"),
        (["upstream-token"], "token response is not a JSON object"),
    ],
)
def test_a_malformed_token_response_is_unavailable_and_not_retried(
    source: ClientCredentialsSource, server: AuthorizationServer, body: Any, reason: str
) -> None:
    server.replies = [Reply(body=body)]

    error = failure(lambda: source.token((), TICKETS))

    assert server.count == 1
    assert error.reason == f"upstream tickets: {reason}"
    assert all("upstream-token" not in text for text in texts_of(error))


def test_an_oversized_answer_is_unavailable(
    source: ClientCredentialsSource, server: AuthorizationServer
) -> None:
    server.replies = [Reply(body=token_body(padding="x" * 70_000))]

    error = failure(lambda: source.token((), TICKETS))

    assert error.reason == "upstream tickets: answer too large"


def test_a_redirect_is_not_followed(
    source: ClientCredentialsSource, server: AuthorizationServer
) -> None:
    elsewhere = AuthorizationServer()
    server.replies = [Reply(302, {}, {"Location": elsewhere.url})]
    try:
        error = failure(lambda: source.token((), TICKETS))
    finally:
        elsewhere.stop()

    assert elsewhere.count == 0
    assert server.count == 1
    assert error.reason == (
        "upstream tickets: authorization server answered 302 (redirects are not followed)"
    )


# --- nothing leaks ----------------------------------------------------------------------------


def test_no_secret_or_token_appears_in_any_error_or_repr(
    make_source: Callable[..., ClientCredentialsSource], server: AuthorizationServer
) -> None:
    source = make_source(retries=0, auth_method="client_secret_post")
    server.replies = [
        oauth_error(400, SECRET, f"echo {SECRET} upstream-token-1"),
        Reply(500, {"error": "server_error", "error_description": SECRET}),
        Reply(body=token_body("upstream-token-3", token_type=None)),
        Reply(body=token_body("upstream-token-4", expires_in="upstream-token-4")),
    ]
    texts: list[str] = []
    for _ in server.replies[:]:
        texts += texts_of(failure(lambda: source.token((), TICKETS)))
    token = source.token((), TICKETS)
    texts += [repr(token), repr(source.settings), str(token)]

    assert token.access_token == "upstream-token-5"
    for text in texts:
        assert SECRET not in text
        assert "upstream-token" not in text


def test_a_failure_is_remembered_briefly_and_answered_at_once(
    make_source: Callable[..., ClientCredentialsSource],
    server: AuthorizationServer,
    clock: FakeClock,
) -> None:
    source = make_source(failure_memory=5.0)
    server.replies = [oauth_error(401, "invalid_client", "bad secret")]
    failure(lambda: source.token((), TICKETS))

    remembered = failure(lambda: source.token((), TICKETS))
    other_scope = source.token(("tickets.read",), TICKETS)  # another key: asked
    clock.advance(5.0)
    later = source.token((), TICKETS)

    assert "invalid_client" in remembered.reason
    assert "failed recently" in remembered.reason
    assert other_scope.access_token == "upstream-token-2"
    assert later.access_token == "upstream-token-3"
    assert server.count == 3


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"access_token": "t", "token_type": "DPoP", "expires_in": 60}, "not a bearer token"),
        ({"access_token": "t\r\nX-Evil: 1", "token_type": "Bearer", "expires_in": 60}, "unfit"),
        ({"access_token": "a b", "token_type": "Bearer", "expires_in": 60}, "unfit"),
    ],
)
def test_a_token_that_cannot_go_into_a_bearer_header_is_refused(
    source: ClientCredentialsSource, server: AuthorizationServer, body: Any, reason: str
) -> None:
    server.replies = [Reply(200, body)]

    error = failure(lambda: source.token((), TICKETS))

    assert reason in error.reason


def test_a_lower_case_bearer_token_type_is_spelled_bearer(
    source: ClientCredentialsSource, server: AuthorizationServer
) -> None:
    server.replies = [Reply(200, {"access_token": "t", "token_type": "bearer", "expires_in": 60})]

    assert source.token((), TICKETS).token_type == "Bearer"
