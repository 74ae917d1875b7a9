"""The gateway's client of the token endpoint (sidecar/client.py), against a scripted token
endpoint served over real HTTP on loopback: the form and client authentication it sends, its
cache, single-flight, typed errors, transport failures, and that no token or secret leaks."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import pytest
import requests

from sidecar.client import (
    ACCESS_TOKEN_TYPE,
    JWT_TOKEN_TYPE,
    TOKEN_EXCHANGE,
    Credential,
    ExchangeError,
    InvalidClient,
    InvalidGrant,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    ServerError,
    TemporarilyUnavailable,
    TokenExchangeClient,
    TransportError,
    UnauthorizedClient,
    UnsupportedGrantType,
)
from tests.conftest import FakeClock

CODE_SEARCH = "https://code-search.internal/mcp"
TICKETS = "https://tickets.internal/mcp"
SUBJECT = "eyJhbGciOiJSUzI1NiJ9.the-users-subject-token.signature"
SECRET = "gateway-secret-" + "x" * 24


@dataclass
class Reply:
    """What the fake endpoint answers: ``body`` as JSON (a str or bytes as it is), after
    ``delay`` seconds."""

    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up before the answer (the timeout test): nothing to report


@dataclass
class Received:
    form: dict[str, list[str]]
    headers: dict[str, str]


class TokenEndpoint:
    """A scripted token endpoint: records each request, answers with ``respond(request)``; by
    default a Bearer token ``minted-<n>`` that expires in 60 s."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.respond: Callable[[Received], Reply] = lambda _: Reply()
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        self.server = QuietServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_port}/token"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    @property
    def count(self) -> int:
        return len(self.received)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def _answer(self, received: Received) -> tuple[Reply, Any]:
        with self._lock:
            self.received.append(received)
            number = len(self.received)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            reply = self.respond(received)
            time.sleep(reply.delay)
        finally:
            with self._lock:
                self.active -= 1
        body = token_body(f"minted-{number}") if reply.body is None else reply.body
        return reply, body

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = parse_qs(self.rfile.read(length).decode(), keep_blank_values=True)
                reply, body = endpoint._answer(Received(form, dict(self.headers.items())))
                raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                try:
                    self.send_response(reply.status)
                    content_type = "application/json" if raw.startswith(b"{") else "text/html"
                    self.send_header("Content-Type", content_type)
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


def token_body(access_token: str = "minted", **members: Any) -> dict[str, Any]:
    body = {
        "access_token": access_token,
        "issued_token_type": ACCESS_TOKEN_TYPE,
        "token_type": "Bearer",
        "expires_in": 60,
        "scope": "code.read",
    }
    body.update(members)
    return {name: value for name, value in body.items() if value is not None}


def oauth_error(status: int, error: str, description: str, **headers: str) -> Reply:
    body = {"error": error, "error_description": description}
    return Reply(status=status, body=body, headers=headers)


@pytest.fixture
def endpoint() -> Iterator[TokenEndpoint]:
    served = TokenEndpoint()
    yield served
    served.stop()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def client(endpoint: TokenEndpoint, clock: FakeClock) -> Iterator[TokenExchangeClient]:
    with TokenExchangeClient(endpoint.url, "gateway", SECRET, clock=clock) as built:
        yield built


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


def assert_nothing_leaked(*texts: str) -> None:
    for text in texts:
        assert SUBJECT not in text
        assert SECRET not in text


# --- the request ------------------------------------------------------------------------------


def test_an_exchange_sends_the_rfc_8693_form_with_basic_authentication(
    endpoint: TokenEndpoint, clock: FakeClock
) -> None:
    client = TokenExchangeClient(endpoint.url, "gate:way", "a:b+c d/é", clock=clock)

    credential = client.exchange(SUBJECT, CODE_SEARCH, scope="code.read")

    (received,) = endpoint.received
    assert received.form == {
        "grant_type": [TOKEN_EXCHANGE],
        "subject_token": [SUBJECT],
        "subject_token_type": [ACCESS_TOKEN_TYPE],
        "audience": [CODE_SEARCH],
        "scope": ["code.read"],
    }
    # RFC 6749 §2.3.1: each of id and secret is form-urlencoded, then the pair base64-encoded.
    expected = base64.b64encode(b"gate%3Away:a%3Ab%2Bc%20d%2F%C3%A9").decode()
    assert received.headers["Authorization"] == f"Basic {expected}"
    assert credential.access_token == "minted-1"
    assert credential.token_type == "Bearer"
    assert credential.issued_token_type == ACCESS_TOKEN_TYPE
    assert credential.expires_in == 60
    assert credential.scope == "code.read"
    assert credential.expires_at == 1060.0
    assert credential.extra == {}


def test_client_secret_post_sends_the_credentials_in_the_form(
    endpoint: TokenEndpoint, clock: FakeClock
) -> None:
    client = TokenExchangeClient(
        endpoint.url, "gateway", SECRET, auth_method="client_secret_post", clock=clock
    )

    client.exchange(SUBJECT, CODE_SEARCH)

    (received,) = endpoint.received
    assert received.form["client_id"] == ["gateway"]
    assert received.form["client_secret"] == [SECRET]
    assert "Authorization" not in received.headers
    assert "scope" not in received.form


def test_resource_and_token_types_are_sent_when_given(
    client: TokenExchangeClient, endpoint: TokenEndpoint
) -> None:
    client.exchange(
        SUBJECT,
        resource=TICKETS,
        subject_token_type=JWT_TOKEN_TYPE,
        requested_token_type=ACCESS_TOKEN_TYPE,
    )

    form = endpoint.received[0].form
    assert form["resource"] == [TICKETS]
    assert form["subject_token_type"] == [JWT_TOKEN_TYPE]
    assert form["requested_token_type"] == [ACCESS_TOKEN_TYPE]
    assert "audience" not in form


def test_an_exchange_needs_an_audience_or_a_resource(client: TokenExchangeClient) -> None:
    with pytest.raises(ValueError, match="audience or a resource"):
        client.exchange(SUBJECT)


def test_an_unknown_auth_method_is_refused() -> None:
    with pytest.raises(ValueError, match="auth_method"):
        TokenExchangeClient("http://127.0.0.1:1/token", "gateway", SECRET, auth_method="none")  # type: ignore[arg-type]


def test_extra_response_members_are_kept(
    client: TokenExchangeClient, endpoint: TokenEndpoint
) -> None:
    endpoint.respond = lambda _: Reply(body=token_body(refresh_hint="x", credential_header="X-C"))

    credential = client.exchange(SUBJECT, CODE_SEARCH)

    assert credential.extra == {"refresh_hint": "x", "credential_header": "X-C"}


# --- the cache ----------------------------------------------------------------------------------


def test_the_same_exchange_is_served_from_the_cache(
    client: TokenExchangeClient, endpoint: TokenEndpoint
) -> None:
    first = client.exchange(SUBJECT, CODE_SEARCH, scope="code.read")
    second = client.exchange(SUBJECT, CODE_SEARCH, scope="code.read")

    assert second is first
    assert endpoint.count == 1


@pytest.mark.parametrize(
    "other",
    [
        pytest.param({"subject_token": SUBJECT + "2"}, id="subject"),
        pytest.param({"audience": TICKETS}, id="audience"),
        pytest.param({"scope": "code.search"}, id="scope"),
        pytest.param({"scope": None}, id="no-scope"),
        pytest.param({"requested_token_type": JWT_TOKEN_TYPE}, id="requested-token-type"),
        pytest.param({"audience": None, "resource": CODE_SEARCH}, id="resource-not-audience"),
    ],
)
def test_a_different_exchange_is_a_new_request(
    client: TokenExchangeClient, endpoint: TokenEndpoint, other: dict[str, Any]
) -> None:
    request = {"subject_token": SUBJECT, "audience": CODE_SEARCH, "scope": "code.read"}
    first = client.exchange(**request)
    second = client.exchange(**{**request, **other})

    assert second.access_token != first.access_token
    assert endpoint.count == 2


def test_the_scope_is_normalised_so_its_order_is_no_key(
    client: TokenExchangeClient, endpoint: TokenEndpoint
) -> None:
    client.exchange(SUBJECT, CODE_SEARCH, scope="code.search code.read")
    client.exchange(SUBJECT, CODE_SEARCH, scope=["code.read", "code.search"])
    client.exchange(SUBJECT, CODE_SEARCH, scope=("code.search", "code.read code.search"))

    assert endpoint.count == 1
    assert endpoint.received[0].form["scope"] == ["code.read code.search"]


def test_a_cached_credential_is_used_until_the_margin_before_it_expires(
    client: TokenExchangeClient, endpoint: TokenEndpoint, clock: FakeClock
) -> None:
    first = client.exchange(SUBJECT, CODE_SEARCH)  # expires_in 60, margin 10

    clock.advance(49.9)
    assert client.exchange(SUBJECT, CODE_SEARCH) is first
    clock.advance(0.1)
    renewed = client.exchange(SUBJECT, CODE_SEARCH)

    assert renewed.access_token == "minted-2"
    assert endpoint.count == 2


def test_the_margin_is_configurable(endpoint: TokenEndpoint, clock: FakeClock) -> None:
    client = TokenExchangeClient(endpoint.url, "gateway", SECRET, margin=30, clock=clock)
    client.exchange(SUBJECT, CODE_SEARCH)

    clock.advance(30)
    client.exchange(SUBJECT, CODE_SEARCH)

    assert endpoint.count == 2


@pytest.mark.parametrize("expires_in", [None, 10, 0], ids=["absent", "equal-to-margin", "zero"])
def test_a_credential_without_a_useful_lifetime_is_not_cached(
    client: TokenExchangeClient, endpoint: TokenEndpoint, expires_in: int | None
) -> None:
    endpoint.respond = lambda _: Reply(body=token_body(expires_in=expires_in))

    first = client.exchange(SUBJECT, CODE_SEARCH)
    client.exchange(SUBJECT, CODE_SEARCH)

    assert first.expires_in == expires_in
    assert endpoint.count == 2


def test_an_error_is_not_cached(client: TokenExchangeClient, endpoint: TokenEndpoint) -> None:
    replies = iter([oauth_error(400, "invalid_grant", "The token is invalid."), Reply()])
    endpoint.respond = lambda _: next(replies)

    with pytest.raises(InvalidGrant):
        client.exchange(SUBJECT, CODE_SEARCH)
    credential = client.exchange(SUBJECT, CODE_SEARCH)

    assert credential.access_token == "minted-2"
    assert endpoint.count == 2


def test_clear_empties_the_cache(client: TokenExchangeClient, endpoint: TokenEndpoint) -> None:
    client.exchange(SUBJECT, CODE_SEARCH)
    client.clear()
    client.exchange(SUBJECT, CODE_SEARCH)

    assert endpoint.count == 2


def test_the_cache_keeps_the_most_recently_used_entries(
    endpoint: TokenEndpoint, clock: FakeClock
) -> None:
    client = TokenExchangeClient(endpoint.url, "gateway", SECRET, max_entries=2, clock=clock)
    client.exchange(SUBJECT, "https://a.internal")
    client.exchange(SUBJECT, "https://b.internal")
    client.exchange(SUBJECT, "https://a.internal")  # a hit: a is now the most recent
    client.exchange(SUBJECT, "https://c.internal")  # evicts b
    assert endpoint.count == 3

    client.exchange(SUBJECT, "https://a.internal")
    client.exchange(SUBJECT, "https://c.internal")
    assert endpoint.count == 3
    client.exchange(SUBJECT, "https://b.internal")
    assert endpoint.count == 4


# --- single-flight ------------------------------------------------------------------------------


def test_concurrent_identical_exchanges_share_one_request(
    client: TokenExchangeClient, endpoint: TokenEndpoint
) -> None:
    endpoint.respond = lambda _: Reply(delay=0.3)

    results = in_threads(20, lambda: client.exchange(SUBJECT, CODE_SEARCH, scope="code.read"))

    assert endpoint.count == 1
    assert all(isinstance(result, Credential) for result in results), results
    assert {result.access_token for result in results} == {"minted-1"}


def test_concurrent_distinct_exchanges_proceed_in_parallel(
    client: TokenExchangeClient, endpoint: TokenEndpoint
) -> None:
    endpoint.respond = lambda _: Reply(delay=0.3)
    audiences = iter([CODE_SEARCH, TICKETS])
    lock = threading.Lock()

    def exchange() -> Credential:
        with lock:
            audience = next(audiences)
        return client.exchange(SUBJECT, audience)

    results = in_threads(2, exchange)

    assert endpoint.count == 2
    assert endpoint.max_active == 2
    assert {result.access_token for result in results} == {"minted-1", "minted-2"}


def test_the_in_flight_error_reaches_every_waiter(
    client: TokenExchangeClient, endpoint: TokenEndpoint
) -> None:
    refusal = oauth_error(400, "invalid_scope", "The requested scope is not allowed.")
    refusal.delay = 0.3
    endpoint.respond = lambda _: refusal

    results = in_threads(20, lambda: client.exchange(SUBJECT, CODE_SEARCH, scope="code.write"))

    assert endpoint.count == 1
    assert all(isinstance(result, InvalidScope) for result in results), results


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error", "expected"),
    [
        (400, "invalid_request", InvalidRequest),
        (401, "invalid_client", InvalidClient),
        (400, "invalid_grant", InvalidGrant),
        (400, "unauthorized_client", UnauthorizedClient),
        (400, "unsupported_grant_type", UnsupportedGrantType),
        (400, "invalid_scope", InvalidScope),
        (400, "invalid_target", InvalidTarget),
        (503, "temporarily_unavailable", TemporarilyUnavailable),
        (500, "server_error", ServerError),
        (400, "slow_down", ExchangeError),  # a code this client has no class for
    ],
)
def test_each_oauth_error_raises_its_own_exception(
    client: TokenExchangeClient,
    endpoint: TokenEndpoint,
    status: int,
    error: str,
    expected: type[ExchangeError],
) -> None:
    endpoint.respond = lambda _: oauth_error(status, error, "A fixed description.")

    with pytest.raises(ExchangeError) as raised:
        client.exchange(SUBJECT, CODE_SEARCH)

    assert type(raised.value) is expected
    assert raised.value.error == error
    assert raised.value.status == status
    assert raised.value.description == "A fixed description."
    assert raised.value.retry_after is None
    assert str(raised.value) == f"{error}: A fixed description. (HTTP {status})"
    assert_nothing_leaked(str(raised.value), repr(raised.value))


@pytest.mark.parametrize("status", [503, 429])
def test_retry_after_in_seconds_is_surfaced(
    client: TokenExchangeClient, endpoint: TokenEndpoint, status: int
) -> None:
    endpoint.respond = lambda _: oauth_error(
        status, "temporarily_unavailable", "Try later.", **{"Retry-After": "7"}
    )

    with pytest.raises(TemporarilyUnavailable) as raised:
        client.exchange(SUBJECT, CODE_SEARCH)

    assert raised.value.retry_after == 7.0
    assert raised.value.status == status


def test_retry_after_as_an_http_date_is_surfaced_in_seconds(
    client: TokenExchangeClient, endpoint: TokenEndpoint
) -> None:
    later = formatdate(time.time() + 30, usegmt=True)
    endpoint.respond = lambda _: oauth_error(
        503, "temporarily_unavailable", "Try later.", **{"Retry-After": later}
    )

    with pytest.raises(TemporarilyUnavailable) as raised:
        client.exchange(SUBJECT, CODE_SEARCH)

    assert raised.value.retry_after is not None
    assert 25 <= raised.value.retry_after <= 31


def test_an_echoed_subject_token_or_secret_is_redacted(
    client: TokenExchangeClient, endpoint: TokenEndpoint
) -> None:
    endpoint.respond = lambda _: oauth_error(400, "invalid_grant", f"bad {SUBJECT} for {SECRET}")

    with pytest.raises(InvalidGrant) as raised:
        client.exchange(SUBJECT, CODE_SEARCH)

    assert raised.value.description == "bad [redacted] for [redacted]"
    assert_nothing_leaked(str(raised.value), repr(raised.value))


# --- transport failures -------------------------------------------------------------------------


def test_a_slow_endpoint_is_a_transport_error_after_the_timeout(
    endpoint: TokenEndpoint, clock: FakeClock
) -> None:
    endpoint.respond = lambda _: Reply(delay=1.5)
    client = TokenExchangeClient(endpoint.url, "gateway", SECRET, timeout=0.2, clock=clock)

    started = time.monotonic()
    with pytest.raises(TransportError) as raised:
        client.exchange(SUBJECT, CODE_SEARCH)

    assert time.monotonic() - started < 1.0
    assert raised.value.error == "transport_error"
    assert raised.value.status is None
    assert_nothing_leaked(str(raised.value), repr(raised.value), repr(raised.value.__cause__))


def test_a_refused_connection_is_a_transport_error(clock: FakeClock) -> None:
    with socket.socket() as probe:  # a port nothing listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = TokenExchangeClient(f"http://127.0.0.1:{port}/token", "gateway", SECRET, clock=clock)

    with pytest.raises(TransportError) as raised:
        client.exchange(SUBJECT, CODE_SEARCH)

    assert_nothing_leaked(str(raised.value), repr(raised.value), str(raised.value.__cause__))


@pytest.mark.parametrize(
    ("status", "body"),
    [
        pytest.param(502, "<html><body>Bad Gateway</body></html>", id="html-502"),
        pytest.param(200, "not json", id="not-json-200"),
        pytest.param(200, [1, 2], id="json-not-an-object"),
        pytest.param(200, {"token_type": "Bearer"}, id="no-access-token"),
        pytest.param(200, token_body(expires_in="60"), id="expires-in-not-a-number"),
        pytest.param(400, {"message": "no"}, id="error-without-code"),
        pytest.param(307, "", id="redirect"),
    ],
)
def test_an_answer_that_is_not_oauth_is_a_transport_error(
    client: TokenExchangeClient, endpoint: TokenEndpoint, status: int, body: Any
) -> None:
    headers = {"Location": "http://127.0.0.1:1/elsewhere"} if status == 307 else {}
    endpoint.respond = lambda _: Reply(status=status, body=body, headers=headers)

    with pytest.raises(TransportError) as raised:
        client.exchange(SUBJECT, CODE_SEARCH)

    assert raised.value.status == status
    assert endpoint.count == 1  # a redirect is not followed
    assert_nothing_leaked(str(raised.value), repr(raised.value))


# --- the credential -----------------------------------------------------------------------------


def test_the_credential_repr_does_not_show_the_token(
    client: TokenExchangeClient, endpoint: TokenEndpoint
) -> None:
    endpoint.respond = lambda _: Reply(body=token_body(SUBJECT))  # the token, easy to look for

    credential = client.exchange(SUBJECT, CODE_SEARCH)

    assert credential.access_token == SUBJECT
    assert SUBJECT not in repr(credential)
    assert "Bearer" in repr(credential)


@pytest.mark.parametrize("token_type", ["Bearer", "bearer", "BEARER"])
def test_a_bearer_credential_goes_in_the_authorization_header(token_type: str) -> None:
    credential = Credential("t0k", token_type, ACCESS_TOKEN_TYPE, 60, None)

    assert credential.authorization_header() == "Bearer t0k"
    assert credential.headers() == {"Authorization": "Bearer t0k"}


def test_a_credential_goes_in_the_header_its_response_names() -> None:
    extra = {"credential_header": "X-Upstream-Credential"}
    credential = Credential("t0k", "N_A", ACCESS_TOKEN_TYPE, 60, None, extra=extra)

    assert credential.headers() == {"X-Upstream-Credential": "t0k"}
    with pytest.raises(ValueError, match="not sent as an Authorization header"):
        credential.authorization_header()


@pytest.mark.parametrize(
    "extra",
    [{}, {"credential_header": "Bad Header\r\n"}, {"credential_header": 7}],
    ids=["none", "not-a-header-name", "not-a-string"],
)
def test_a_non_bearer_credential_without_a_usable_header_cannot_be_presented(
    extra: dict[str, Any],
) -> None:
    credential = Credential("t0k", "N_A", ACCESS_TOKEN_TYPE, 60, None, extra=extra)

    with pytest.raises(ValueError, match="credential_header") as raised:
        credential.headers()
    assert "t0k" not in str(raised.value)


def test_closing_leaves_a_session_the_caller_passed_in_open(endpoint: TokenEndpoint) -> None:
    class Session(requests.Session):
        closed = False

        def close(self) -> None:
            self.closed = True
            super().close()

    session = Session()
    with TokenExchangeClient(endpoint.url, "gateway", SECRET, session=session) as client:
        client.exchange(SUBJECT, CODE_SEARCH)

    assert not session.closed
    assert endpoint.count == 1
