"""``POST /token`` as a bare WSGI callable (``sidecar/web/token.py``): ``TokenEndpoint`` and
``TokenRouter`` called with hand-built environs and a recording ``start_response``, no server and
no database. The endpoint's services are real where cheap (the grant over an in-memory issuer
directory, the client authenticator over an in-memory ``jti`` store, the rate limiter, the
metrics) and an audit trail that records its events in a list.

- RFC 6749 §3.2: the token endpoint takes POST with an ``application/x-www-form-urlencoded``
  body, parameters never in the URL; §5.1 (``Cache-Control: no-store``, ``Pragma: no-cache`` on
  every answer) and §5.2 (the error body; ``invalid_client`` 401 with ``WWW-Authenticate`` after
  Basic; ``unsupported_grant_type``; ``unauthorized_client``);
- RFC 8693 §2.2.1 (the success body) and §2.2.2 (``invalid_target``);
- RFC 6585 §4 (429 with ``Retry-After``).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest

from sidecar.audit import GRANTED, AuditEvent
from sidecar.clients import ClientAuthenticator
from sidecar.config import Settings, settings_from_mapping
from sidecar.errors import TemporarilyUnavailableError
from sidecar.exchange.caches import MintedTokenCache
from sidecar.exchange.grant import TokenExchangeGrant
from sidecar.exchange.policy import PolicySet
from sidecar.exchange.request import MAX_BODY_BYTES
from sidecar.exchange.subject import token_fingerprint
from sidecar.keys.keyring import SigningKey
from sidecar.metrics import Metrics
from sidecar.ratelimit import RateLimiter
from sidecar.web.token import TokenEndpoint, TokenRouter
from tests.conftest import (
    ACCESS_TOKEN_TYPE,
    CODE_SEARCH,
    GATEWAY_SECRET,
    OTHER_SECRET,
    SIDECAR_ISSUER,
    TOKEN_EXCHANGE,
    FakeClock,
    TestIdP,
)
from tests.unit.support import (
    InMemoryJtis,
    PolicyHolder,
    issuer_directory,
    never_fetch,
    new_signing_key,
)

FORM_TYPE = "application/x-www-form-urlencoded"
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
UNKNOWN_AUDIENCE = "https://unknown-upstream.internal/mcp"


# --- the services the endpoint uses ---------------------------------------------------------------


class RecordingAudit:
    """``AuditTrail.record``: every event in a list; ``fail_grants``/``fail_denials`` make it
    raise as the real trail does when it cannot record."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self.fail_grants: Exception | None = None
        self.fail_denials: Exception | None = None

    def record(self, event: AuditEvent) -> None:
        failure = self.fail_grants if event.decision == GRANTED else self.fail_denials
        if failure is not None:
            raise failure
        self.events.append(event)

    @property
    def only(self) -> AuditEvent:
        assert len(self.events) == 1, self.events
        return self.events[0]


@dataclass
class EndpointServices:
    """The attributes of ``sidecar.services.Services`` that ``TokenEndpoint`` reads."""

    authenticator: ClientAuthenticator
    rate_limiter: RateLimiter
    grant: Any
    policies: PolicyHolder
    signing_key: Callable[[], SigningKey]
    clock: Callable[[], float]
    audit: RecordingAudit = field(default_factory=RecordingAudit)


@pytest.fixture
def clock() -> FakeClock:
    """Fixed, in whole seconds, from the wall clock (on which PyJWT checks the subject token)."""
    return FakeClock(float(int(time.time())))


@pytest.fixture
def key(clock: FakeClock) -> SigningKey:
    return new_signing_key(clock.now)


def make_services(
    settings: Settings, idp: TestIdP, key: SigningKey, clock: FakeClock
) -> EndpointServices:
    return EndpointServices(
        authenticator=ClientAuthenticator(settings, InMemoryJtis(), clock, never_fetch),  # type: ignore[arg-type]
        rate_limiter=RateLimiter(settings, clock),
        grant=TokenExchangeGrant(
            issuer=settings.issuer,
            max_ttl=settings.tokens.max_ttl,
            leeway=settings.tokens.leeway,
            issuers=issuer_directory(idp),
            minted_cache=MintedTokenCache(100, min_remaining=0.5),
        ),
        policies=PolicyHolder(PolicySet(entry.to_policy() for entry in settings.policies)),
        signing_key=lambda: key,
        clock=clock,
    )


@pytest.fixture
def services(
    settings: Settings, idp: TestIdP, key: SigningKey, clock: FakeClock
) -> EndpointServices:
    return make_services(settings, idp, key, clock)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def endpoint(services: EndpointServices, metrics: Metrics) -> TokenEndpoint:
    return TokenEndpoint(services, metrics)  # type: ignore[arg-type]


# --- WSGI by hand ---------------------------------------------------------------------------------


def basic(client_id: str = "gateway", secret: str = GATEWAY_SECRET) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def token_form(subject_token: str, **params: str | None) -> bytes:
    values: dict[str, str | None] = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject_token,
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "audience": CODE_SEARCH,
    }
    values.update(params)
    return urlencode({k: v for k, v in values.items() if v is not None}).encode()


def make_environ(
    body: bytes = b"",
    *,
    method: str = "POST",
    path: str = "/token",
    query: str = "",
    content_type: str | None = FORM_TYPE,
    content_length: str | None = "auto",
    authorization: str | None = None,
    remote_addr: str = "127.0.0.1",
) -> dict[str, Any]:
    """A WSGI environ (PEP 3333) as a server builds it; ``content_length="auto"`` is the body's."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": remote_addr,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if content_type is not None:
        environ["CONTENT_TYPE"] = content_type
    if content_length == "auto":
        environ["CONTENT_LENGTH"] = str(len(body))
    elif content_length is not None:
        environ["CONTENT_LENGTH"] = content_length
    if authorization is not None:
        environ["HTTP_AUTHORIZATION"] = authorization
    return environ


@dataclass
class Answer:
    status: str
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def code(self) -> int:
        return int(self.status.split(" ", 1)[0])

    def header(self, name: str) -> str | None:
        found = [value for key, value in self.headers if key.lower() == name.lower()]
        assert len(found) <= 1, f"{name} sent {len(found)} times"
        return found[0] if found else None

    def json(self) -> dict[str, Any]:
        assert self.header("Content-Type") == "application/json"
        body: dict[str, Any] = json.loads(self.body)
        return body


class StartResponse:
    """A recording ``start_response`` that holds servers' rules: called once, a status line."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, str]]]] = []

    def __call__(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        assert not self.calls, "start_response called twice"
        self.calls.append((status, headers))
        return lambda data: None


def call(app: Callable[..., Any], environ: dict[str, Any]) -> Answer:
    start_response = StartResponse()
    body = b"".join(app(environ, start_response))
    ((status, headers),) = start_response.calls
    return Answer(status, headers, body)


def post(endpoint: TokenEndpoint, body: bytes, **environ: Any) -> Answer:
    environ.setdefault("authorization", basic())
    return call(endpoint, make_environ(body, **environ))


def assert_error(answer: Answer, status: str, error: str) -> dict[str, Any]:
    """RFC 6749 §5.2: the status, the JSON body with the code, and the no-store headers."""
    assert answer.status == status
    body = answer.json()
    assert body["error"] == error
    assert set(body) == {"error", "error_description"}
    assert {name: answer.header(name) for name in NO_STORE} == NO_STORE
    assert answer.header("Content-Length") == str(len(answer.body))
    return body


# --- transport checks -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"query": "audience=x"}, "parameters in the query string"),
        ({"content_type": "application/json"}, "body is not application/x-www-form-urlencoded"),
        ({"content_type": None}, "body is not application/x-www-form-urlencoded"),
        ({"content_length": None}, "body length missing or over size cap"),
        ({"content_length": ""}, "body length missing or over size cap"),
        ({"content_length": "-1"}, "body length missing or over size cap"),
        ({"content_length": "1e3"}, "body length missing or over size cap"),
        ({"content_length": "٣"}, "body length missing or over size cap"),  # a non-ASCII digit
        ({"content_length": str(MAX_BODY_BYTES + 1)}, "body length missing or over size cap"),
        ({"content_length": "9" * 5000}, "body length missing or over size cap"),
        ({"content_length": "5000"}, "body shorter than its Content-Length"),
    ],
    ids=[
        "query-string",
        "json",
        "no-content-type",
        "no-content-length",
        "empty-content-length",
        "negative",
        "not-an-integer",
        "non-ascii-digit",
        "over-the-cap",
        "five-thousand-digits",
        "short-body",
    ],
)
def test_a_transport_fault_is_invalid_request_with_no_store(
    endpoint: TokenEndpoint,
    services: EndpointServices,
    idp: TestIdP,
    overrides: dict[str, Any],
    reason: str,
) -> None:
    answer = post(endpoint, token_form(idp.token()), **overrides)

    assert_error(answer, "400 Bad Request", "invalid_request")
    event = services.audit.only
    assert (event.error, event.reason, event.client_id) == ("invalid_request", reason, None)


def test_a_transport_fault_never_echoes_the_request(endpoint: TokenEndpoint, idp: TestIdP) -> None:
    subject = idp.token()

    answer = post(endpoint, token_form(subject), query=f"subject_token={subject}")

    assert_error(answer, "400 Bad Request", "invalid_request")
    assert subject.encode() not in answer.body
    assert b"subject_token" not in answer.body


def test_the_form_type_may_carry_a_charset_parameter(endpoint: TokenEndpoint, idp: TestIdP) -> None:
    answer = post(
        endpoint,
        token_form(idp.token()),
        content_type="Application/X-WWW-Form-Urlencoded; charset=UTF-8",
    )

    assert answer.status == "200 OK"


def test_only_content_length_bytes_of_the_body_are_read(
    endpoint: TokenEndpoint, idp: TestIdP
) -> None:
    body = token_form(idp.token())
    environ = make_environ(body + b"&audience=" + UNKNOWN_AUDIENCE.encode(), authorization=basic())
    environ["CONTENT_LENGTH"] = str(len(body))

    answer = call(endpoint, environ)

    assert answer.status == "200 OK"  # the unknown audience beyond Content-Length was not read


def test_a_body_that_is_not_a_form_is_invalid_request(endpoint: TokenEndpoint) -> None:
    answer = post(endpoint, b'{"grant_type": "token-exchange"}')

    assert_error(answer, "400 Bad Request", "invalid_request")


def test_a_missing_grant_type_is_invalid_request(endpoint: TokenEndpoint, idp: TestIdP) -> None:
    answer = post(endpoint, token_form(idp.token(), grant_type=None))

    assert_error(answer, "400 Bad Request", "invalid_request")


def test_another_grant_type_is_unsupported_grant_type(endpoint: TokenEndpoint) -> None:
    answer = post(endpoint, urlencode({"grant_type": "client_credentials"}).encode())

    assert_error(answer, "400 Bad Request", "unsupported_grant_type")
    assert b"client_credentials" not in answer.body


# --- client authentication and admission ----------------------------------------------------------


def test_a_failed_basic_authentication_is_401_with_a_challenge(
    endpoint: TokenEndpoint, services: EndpointServices, idp: TestIdP
) -> None:
    wrong = "wrong-secret-" + "w" * 24

    answer = post(endpoint, token_form(idp.token()), authorization=basic("gateway", wrong))

    assert_error(answer, "401 Unauthorized", "invalid_client")
    assert (answer.header("WWW-Authenticate") or "").startswith("Basic realm=")
    assert wrong.encode() not in answer.body
    assert services.audit.only.client_id is None  # not authenticated: no client is named


def test_a_failed_client_secret_post_is_401_without_a_challenge(
    endpoint: TokenEndpoint, idp: TestIdP
) -> None:
    body = token_form(idp.token(), client_id="gateway", client_secret="wrong-" + "w" * 24)

    answer = post(endpoint, body, authorization=None)

    assert_error(answer, "401 Unauthorized", "invalid_client")
    assert answer.header("WWW-Authenticate") is None


def test_a_client_without_the_token_exchange_grant_is_unauthorized_client(
    endpoint: TokenEndpoint, services: EndpointServices, idp: TestIdP
) -> None:
    answer = post(
        endpoint, token_form(idp.token()), authorization=basic("no-exchange", OTHER_SECRET)
    )

    assert_error(answer, "400 Bad Request", "unauthorized_client")
    assert services.audit.only.client_id == "no-exchange"


def limited(
    config: dict[str, Any], idp: TestIdP, key: SigningKey, clock: FakeClock
) -> EndpointServices:
    """The services with a rate limit of one request per second, burst one."""
    settings = settings_from_mapping(
        {**config, "rate_limit": {"per_second": 1, "burst": 1}}, env={}
    )
    return make_services(settings, idp, key, clock)


def test_a_client_over_its_rate_limit_is_429_with_retry_after(
    config: dict[str, Any], idp: TestIdP, key: SigningKey, clock: FakeClock, metrics: Metrics
) -> None:
    services = limited(config, idp, key, clock)
    endpoint = TokenEndpoint(services, metrics)  # type: ignore[arg-type]
    body = token_form(idp.token())

    first = post(endpoint, body)
    second = post(endpoint, body)

    assert first.status == "200 OK"
    assert_error(second, "429 Too Many Requests", "temporarily_unavailable")
    assert second.header("Retry-After") == "1"
    # Refused by the peek before authentication: the claimed client is not named as proven.
    assert (services.audit.events[-1].reason, services.audit.events[-1].client_id) == (
        "rate limit",
        None,
    )


def test_failed_authentications_over_the_peers_budget_are_429_not_401(
    config: dict[str, Any], idp: TestIdP, key: SigningKey, clock: FakeClock, metrics: Metrics
) -> None:
    endpoint = TokenEndpoint(limited(config, idp, key, clock), metrics)  # type: ignore[arg-type]
    wrong = basic("gateway", "wrong-" + "w" * 24)

    first = post(endpoint, token_form(idp.token()), authorization=wrong)
    second = post(endpoint, token_form(idp.token()), authorization=wrong)
    genuine = post(endpoint, token_form(idp.token()))

    assert_error(first, "401 Unauthorized", "invalid_client")
    assert_error(second, "429 Too Many Requests", "temporarily_unavailable")
    assert genuine.status == "200 OK"  # the real client is not locked out by the failures


# --- a grant --------------------------------------------------------------------------------------


def test_a_grant_is_200_with_the_rfc8693_response(
    endpoint: TokenEndpoint, idp: TestIdP, key: SigningKey
) -> None:
    answer = post(endpoint, token_form(idp.token()))

    assert answer.status == "200 OK"
    assert {name: answer.header(name) for name in NO_STORE} == NO_STORE
    assert answer.header("Content-Length") == str(len(answer.body))
    body = answer.json()
    assert body == {
        "access_token": body["access_token"],
        "issued_token_type": ACCESS_TOKEN_TYPE,
        "token_type": "Bearer",
        "expires_in": 120,
        "scope": "code.read",
    }
    claims = jwt.decode(
        body["access_token"],
        jwt.PyJWK(key.public_jwk).key,
        algorithms=[key.algorithm],
        issuer=SIDECAR_ISSUER,
        audience=CODE_SEARCH,
    )
    assert claims["client_id"] == "gateway"


def test_a_grant_is_audited_with_its_jti(
    endpoint: TokenEndpoint,
    services: EndpointServices,
    idp: TestIdP,
    key: SigningKey,
    clock: FakeClock,
) -> None:
    subject = idp.token()

    answer = post(endpoint, token_form(subject))

    claims = jwt.decode(answer.json()["access_token"], options={"verify_signature": False})
    event = services.audit.only
    assert event.decision == "granted"
    assert event.jti == claims["jti"]
    assert (event.client_id, event.kid, event.expires_at) == ("gateway", key.kid, claims["exp"])
    assert (event.subject, event.subject_issuer) == ("alice@example.com", idp.issuer)
    assert event.subject_token_sha256 == token_fingerprint(subject)
    assert (event.audiences, event.scope, event.at) == ([CODE_SEARCH], "code.read", clock.now)
    assert (event.error, event.reason) == (None, None)


def test_a_reused_token_is_audited_as_reused(
    endpoint: TokenEndpoint, services: EndpointServices, idp: TestIdP
) -> None:
    body = token_form(idp.token())

    first = post(endpoint, body).json()
    second = post(endpoint, body).json()

    assert second["access_token"] == first["access_token"]
    assert [e.reason for e in services.audit.events] == [None, "reused a minted token"]
    assert services.audit.events[0].jti == services.audit.events[1].jti


def test_grants_and_denials_are_counted(
    endpoint: TokenEndpoint, metrics: Metrics, idp: TestIdP
) -> None:
    post(endpoint, token_form(idp.token()))
    post(endpoint, token_form(idp.token(), audience=UNKNOWN_AUDIENCE))

    def count(outcome: str, error: str) -> float | None:
        labels = {"outcome": outcome, "error": error}
        return metrics.registry.get_sample_value("sidecar_token_requests_total", labels)

    assert count("granted", "") == 1.0
    assert count("denied", "invalid_target") == 1.0
    assert metrics.registry.get_sample_value("sidecar_token_request_seconds_count") == 2.0


# --- a denial -------------------------------------------------------------------------------------


def test_a_denial_after_authentication_is_audited_with_the_client_and_the_facts(
    endpoint: TokenEndpoint, services: EndpointServices, idp: TestIdP
) -> None:
    subject = idp.token()

    answer = post(endpoint, token_form(subject, audience=UNKNOWN_AUDIENCE))

    assert_error(answer, "400 Bad Request", "invalid_target")
    event = services.audit.only
    assert (event.decision, event.error) == ("denied", "invalid_target")
    assert event.reason == "no policy for the client and target"
    assert event.client_id == "gateway"
    assert (event.subject, event.subject_issuer) == ("alice@example.com", idp.issuer)
    assert event.subject_token_sha256 == token_fingerprint(subject)
    assert event.audiences == [UNKNOWN_AUDIENCE]
    assert event.jti is None


def test_a_denial_never_echoes_the_request(endpoint: TokenEndpoint, idp: TestIdP) -> None:
    subject = idp.token()

    answer = post(endpoint, token_form(subject, audience=UNKNOWN_AUDIENCE, scope="code.read"))

    assert_error(answer, "400 Bad Request", "invalid_target")
    for echoed in (subject, UNKNOWN_AUDIENCE, "alice", "no policy"):
        assert echoed.encode() not in answer.body


def test_a_denial_is_answered_even_when_it_cannot_be_audited(
    endpoint: TokenEndpoint, services: EndpointServices, caplog: pytest.LogCaptureFixture
) -> None:
    services.audit.fail_denials = RuntimeError("audit table gone")

    answer = post(endpoint, b"grant_type=password")

    assert_error(answer, "400 Bad Request", "unsupported_grant_type")
    assert "unexpected RuntimeError" in caplog.text


def test_a_grant_that_cannot_be_audited_is_503_and_sends_no_token(
    endpoint: TokenEndpoint, services: EndpointServices, idp: TestIdP
) -> None:
    services.audit.fail_grants = TemporarilyUnavailableError(reason="audit trail unavailable")

    answer = post(endpoint, token_form(idp.token()))

    assert_error(answer, "503 Service Unavailable", "temporarily_unavailable")
    assert answer.header("Retry-After") is not None
    event = services.audit.only  # the refusal, with what was known
    assert (event.decision, event.client_id, event.jti) == ("denied", "gateway", None)
    assert event.subject == "alice@example.com"


def test_no_signing_key_is_503(
    endpoint: TokenEndpoint, services: EndpointServices, idp: TestIdP
) -> None:
    def no_key() -> SigningKey:
        raise TemporarilyUnavailableError(reason="no signing key")

    services.signing_key = no_key

    answer = post(endpoint, token_form(idp.token()))

    assert_error(answer, "503 Service Unavailable", "temporarily_unavailable")
    assert services.audit.only.reason == "no signing key"


class ExplodingGrant:
    """A grant with a bug: it raises with a message that quotes the request."""

    def __init__(self, message: str) -> None:
        self.message = message

    def exchange(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(self.message)


def test_an_exception_inside_the_grant_is_500_server_error_without_detail(
    endpoint: TokenEndpoint,
    services: EndpointServices,
    idp: TestIdP,
    caplog: pytest.LogCaptureFixture,
) -> None:
    subject = idp.token()
    services.grant = ExplodingGrant(f"cannot handle {subject}")
    caplog.set_level(logging.DEBUG)

    answer = post(endpoint, token_form(subject))

    body = assert_error(answer, "500 Internal Server Error", "server_error")
    assert body == {"error": "server_error", "error_description": "Internal error."}
    event = services.audit.only
    assert (event.error, event.reason, event.client_id) == (
        "server_error",
        "RuntimeError",
        "gateway",
    )
    assert "unexpected RuntimeError" in caplog.text
    assert subject not in caplog.text  # the frames are logged, never the message


# --- TokenRouter ----------------------------------------------------------------------------------


class Recorded:
    """A WSGI app that answers with its own name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [self.name.encode()]


def route(method: str, path: str, listener: str = "gateway") -> str:
    router = TokenRouter(Recorded("token"), Recorded("flask"), listener_of=lambda environ: listener)
    return call(router, make_environ(method=method, path=path)).body.decode()


def test_the_router_sends_post_token_on_the_gateway_listener_to_the_endpoint() -> None:
    assert route("POST", "/token") == "token"


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/token"), ("PUT", "/token"), ("POST", "/token/"), ("POST", "/Token"), ("POST", "/")],
)
def test_the_router_sends_every_other_request_to_flask(method: str, path: str) -> None:
    assert route(method, path) == "flask"


@pytest.mark.parametrize("listener", ["admin", "management"])
def test_the_router_sends_post_token_on_another_listener_to_flask(listener: str) -> None:
    assert route("POST", "/token", listener=listener) == "flask"
