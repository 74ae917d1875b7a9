"""The rate limit of POST /token over real HTTP: a client's budget is spent only by requests that
authenticated as it, whatever the method (client_secret_basic, client_secret_post,
private_key_jwt), so that nobody can lock a client out by claiming its id; failed
authentications are limited per peer address, and over that budget are answered 429 instead of
401 while correct requests from the same address still succeed.

Each test runs in-process, on a service of its own with a frozen clock (no bucket refills unless
the test advances it), and against ``sidecar serve`` (granian, its default workers) with the same
limit, on the real clock (a test that lets a bucket refill waits for it). There the buckets are
per worker process (README: "per client, per worker process"): each source address a test sends
from keeps one connection, so one worker answers all its requests; and since the module's tests
share one server, each test has clients and source addresses of its own (127.0.N.x), so that no
test finds a bucket an earlier one emptied."""

from __future__ import annotations

import base64
import copy
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
from requests.adapters import HTTPAdapter

from sidecar.store.models import AuditEventRow
from tests.conftest import (
    CODE_SEARCH,
    GATEWAY_SECRET,
    ClientKeys,
    FakeClock,
    Gateway,
    InProcessGateway,
    live_service,
)
from tests.functional.http.helpers import assert_oauth_error, assertion_form, exchange_form

BURST = 3
RATE_LIMIT = {"per_second": 1, "burst": BURST}
WRONG_SECRET = "not-the-secret-" + "z" * 24
FLOOD = 120
# Under sidecar serve: how many tests may take clients and addresses of their own (slots 1..).
SLOTS = 16
_next_slot = itertools.count(1)


def slot_client_id(slot: int) -> str:
    return f"gateway-{slot}"


def slot_jwt_client_id(slot: int) -> str:
    return f"jwt-gateway-{slot}"


@pytest.fixture(scope="module")
def gateway_config(
    gateway_config: dict[str, Any], gateway_client_keys: ClientKeys
) -> dict[str, Any]:
    """The limit, and for each slot a copy of gateway (same secret) and of jwt-gateway (same
    key), each with its policy on code-search."""
    gateway_config["rate_limit"] = dict(RATE_LIMIT)
    policies = {
        policy["client_id"]: policy
        for policy in gateway_config["policies"]
        if policy["audience"] == CODE_SEARCH
    }
    for slot in range(1, SLOTS + 1):
        gateway_config["clients"] += [
            {"client_id": slot_client_id(slot), "client_secret": GATEWAY_SECRET},
            {"client_id": slot_jwt_client_id(slot), "jwks": gateway_client_keys.jwks},
        ]
        gateway_config["policies"] += [
            {**policies["gateway"], "client_id": slot_client_id(slot)},
            {**policies[gateway_client_keys.client_id], "client_id": slot_jwt_client_id(slot)},
        ]
    return gateway_config


class SourceAddressAdapter(HTTPAdapter):
    """Connects from ``source`` (a loopback address), so that the service sees that peer."""

    def __init__(self, source: str) -> None:
        self.source = source
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)


class Limited:
    """One test's side of the rate-limited service: its secret client (``client_id``), its
    private_key_jwt client (``keys``), the address it sends from (``source``) and two more, and
    the way time passes (``advance``). Requests from one address share one connection."""

    def __init__(
        self,
        gateway: Gateway,
        *,
        client_id: str,
        keys: ClientKeys,
        source: str,
        other_sources: tuple[str, str],
        advance: Callable[[float], None],
    ) -> None:
        self.gateway = gateway
        self.idp = gateway.idp
        self.client_id = client_id
        self.keys = keys
        self.source = source
        self.other_sources = other_sources
        self.advance = advance
        self.correct = (client_id, GATEWAY_SECRET)
        self.wrong = (client_id, WRONG_SECRET)
        self._sessions: dict[str, requests.Session] = {}

    def session(self, source: str | None = None) -> requests.Session:
        """The kept-alive connection from ``source`` (default: the test's own address)."""
        source = source or self.source
        if source not in self._sessions:
            session = requests.Session()
            session.mount("http://", SourceAddressAdapter(source))
            self._sessions[source] = session
        return self._sessions[source]

    def post(
        self,
        form: list[tuple[str, str]],
        auth: tuple[str, str] | None,
        *,
        headers: dict[str, str] | None = None,
        source: str | None = None,
    ) -> requests.Response:
        return self.session(source).post(
            self.gateway.token_url, data=form, auth=auth, headers=headers or {}, timeout=10
        )

    def exchange(self, subject: str, auth: tuple[str, str] | None = None) -> requests.Response:
        """A token-exchange form with Basic ``auth`` (default: the test's client, correctly)."""
        return self.post(exchange_form(subject), auth or self.correct)

    def audit_rows(self, after_id: int, expected: int) -> list[AuditEventRow]:
        return self.gateway.audit_rows(after_id=after_id, expected=expected)

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()


@pytest.fixture
def limited(request: pytest.FixtureRequest, gateway_target: str) -> Iterator[Limited]:
    """In-process: rate_limit {per_second: 1, burst: 3}, with a frozen clock, gateway and
    jwt-gateway from 127.0.0.1 (127.0.0.2 and .3 for the other peers). Under sidecar serve: the
    same limit on the module's server, the next slot's clients and addresses."""
    if gateway_target == "serve":
        gateway: Gateway = request.getfixturevalue("gateway")
        slot = next(_next_slot)
        assert slot <= SLOTS, "more tests than SLOTS: raise it"
        keys = copy.copy(gateway.client_keys)
        keys.client_id = slot_jwt_client_id(slot)
        served = Limited(
            gateway,
            client_id=slot_client_id(slot),
            keys=keys,
            source=f"127.0.{slot}.1",
            other_sources=(f"127.0.{slot}.2", f"127.0.{slot}.3"),
            advance=time.sleep,  # the real clock: wait for the refill
        )
        try:
            yield served
        finally:
            served.close()
        return
    config: dict[str, Any] = request.getfixturevalue("config")
    config["rate_limit"] = dict(RATE_LIMIT)
    clock = FakeClock()
    client_keys: ClientKeys = request.getfixturevalue("client_keys")
    with live_service(config, clock=clock) as (services, server):
        in_process = Limited(
            InProcessGateway(server, services, config, request.getfixturevalue("idp"), client_keys),
            client_id="gateway",
            keys=client_keys,
            source="127.0.0.1",
            other_sources=("127.0.0.2", "127.0.0.3"),
            advance=clock.advance,
        )
        try:
            yield in_process
        finally:
            in_process.close()


def assert_rate_limited(response: requests.Response, *never_echoed: str) -> int:
    assert_oauth_error(response, 429, "temporarily_unavailable", *never_echoed)
    assert "WWW-Authenticate" not in response.headers
    retry_after = int(response.headers["Retry-After"])
    assert retry_after >= 1
    return retry_after


# What each authentication method sends for the test's clients, as (form, Basic auth): the
# correct credentials or, with wrong=True, a wrong secret or a forged assertion.
Sent = tuple[list[tuple[str, str]], tuple[str, str] | None]
Send = Callable[..., Sent]


def _basic(subject: str, limited: Limited, *, wrong: bool = False) -> Sent:
    return exchange_form(subject), limited.wrong if wrong else limited.correct


def _post(subject: str, limited: Limited, *, wrong: bool = False) -> Sent:
    secret = WRONG_SECRET if wrong else GATEWAY_SECRET
    return exchange_form(subject, client_id=limited.client_id, client_secret=secret), None


def _private_key_jwt(subject: str, limited: Limited, *, wrong: bool = False) -> Sent:
    keys = limited.keys
    assertion = keys.impostor_assertion() if wrong else keys.assertion()  # each with a new jti
    return assertion_form(subject, assertion), None


def post(limited: Limited, sent: Sent) -> requests.Response:
    form, auth = sent
    return limited.post(form, auth)


METHODS: dict[str, Send] = {
    "client_secret_basic": _basic,
    "client_secret_post": _post,
    "private_key_jwt": _private_key_jwt,
}


# --- (a) no lock-out by claiming a client's id ----------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_failures_claiming_a_client_do_not_lock_it_out(limited: Limited, method: str) -> None:
    send = METHODS[method]
    subject = limited.idp.token()
    statuses = []
    for _ in range(FLOOD):
        form, auth = send(subject, limited, wrong=True)
        statuses.append(limited.post(form, auth).status_code)
    # The attacker's own budget of failures, then 429: never a refusal of the real client.
    assert statuses == [401] * BURST + [429] * (FLOOD - BURST)

    # The real client, from the same address, still has its whole burst.
    granted = [post(limited, send(limited.idp.token(), limited)) for _ in range(BURST)]
    assert [r.status_code for r in granted] == [200] * BURST, granted[-1].text


def test_the_lock_out_denials_are_audited_without_a_client(limited: Limited) -> None:
    start = limited.gateway.last_audit_id()
    subject = limited.idp.token()
    for _ in range(BURST + 2):
        limited.exchange(subject, auth=limited.wrong)
    assert limited.exchange(limited.idp.token()).status_code == 200

    rows = limited.audit_rows(start, BURST + 3)
    assert [(r.decision, r.error, r.client_id) for r in rows] == [
        ("denied", "invalid_client", None)
    ] * BURST + [("denied", "temporarily_unavailable", None)] * 2 + [
        ("granted", None, limited.client_id)
    ]
    assert all(
        (r.reason or "").startswith("rate limit of failed authentication") for r in rows[3:5]
    )


# --- (b) every authentication method is limited ---------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_every_authentication_method_is_rate_limited(limited: Limited, method: str) -> None:
    send = METHODS[method]
    subject = limited.idp.token()
    responses = [post(limited, send(subject, limited)) for _ in range(BURST + 2)]

    assert [r.status_code for r in responses] == [200] * BURST + [429] * 2
    retry_after = assert_rate_limited(responses[-1], subject)

    limited.advance(retry_after)
    again = post(limited, send(subject, limited))
    assert again.status_code == 200, again.text


def test_a_refused_client_assertion_is_not_spent(limited: Limited) -> None:
    # Refused before the assertion is verified (its jti is not remembered), so it stays usable.
    for _ in range(BURST):
        response = limited.post(assertion_form(limited.idp.token(), limited.keys.assertion()), None)
        assert response.status_code == 200, response.text
    assertion = limited.keys.assertion()
    assert_rate_limited(limited.post(assertion_form(limited.idp.token(), assertion), None))

    limited.advance(1)
    response = limited.post(assertion_form(limited.idp.token(), assertion), None)
    assert response.status_code == 200, response.text


def test_clients_have_separate_budgets(limited: Limited) -> None:
    for _ in range(BURST):
        assert limited.exchange(limited.idp.token()).status_code == 200
    assert limited.exchange(limited.idp.token()).status_code == 429
    assert post(limited, _private_key_jwt(limited.idp.token(), limited)).status_code == 200


def test_a_client_is_charged_even_when_its_claim_cannot_be_read(limited: Limited) -> None:
    # Two spaces after "Basic": the cheap pre-authentication reading sees no client, the
    # authenticator still accepts it; the budget charged is the one of the client proven.
    start = limited.gateway.last_audit_id()
    credentials = base64.b64encode(f"{limited.client_id}:{GATEWAY_SECRET}".encode()).decode()
    headers = {"Authorization": f"Basic  {credentials}"}
    statuses = [
        limited.post(exchange_form(limited.idp.token()), None, headers=headers)
        for _ in range(BURST + 1)
    ]
    assert [r.status_code for r in statuses] == [200] * BURST + [429]
    assert_rate_limited(statuses[-1])
    # The same, the client's, bucket.
    assert limited.exchange(limited.idp.token()).status_code == 429

    row = limited.audit_rows(start, BURST + 2)[-2]
    assert (row.error, row.reason, row.client_id) == (
        "temporarily_unavailable",
        "rate limit",
        limited.client_id,
    )


# --- (c) failures per peer: 429 instead of 401, never for a correct request -----------------------


def test_failures_over_the_peer_budget_get_429_and_correct_requests_still_pass(
    limited: Limited,
) -> None:
    subject = limited.idp.token()
    failures = [limited.exchange(subject, auth=limited.wrong) for _ in range(BURST)]
    for response in failures:
        assert_oauth_error(response, 401, "invalid_client", subject, WRONG_SECRET)

    over = limited.exchange(subject, auth=limited.wrong)
    retry_after = assert_rate_limited(over, subject, WRONG_SECRET)
    # Whatever the failing request claims, from this address: an unknown id, another client.
    assert_rate_limited(limited.exchange(subject, auth=("ghost-client", WRONG_SECRET)))
    assert_rate_limited(post(limited, _private_key_jwt(subject, limited, wrong=True)))

    # A correct request from the same address, by any method, is answered.
    assert limited.exchange(limited.idp.token()).status_code == 200
    assert post(limited, _private_key_jwt(limited.idp.token(), limited)).status_code == 200
    # ... and does not give the failing ones their budget back.
    assert_rate_limited(limited.exchange(subject, auth=limited.wrong))

    limited.advance(retry_after)
    again = limited.exchange(subject, auth=limited.wrong)
    assert_oauth_error(again, 401, "invalid_client", subject, WRONG_SECRET)


def test_failure_budgets_are_per_peer_address(limited: Limited) -> None:
    subject = limited.idp.token()
    first_peer, second_peer = limited.other_sources

    def status_from(source: str) -> int:
        return limited.post(exchange_form(subject), limited.wrong, source=source).status_code

    try:
        first = [status_from(first_peer)]
    except OSError:
        pytest.skip(f"cannot send from {first_peer} on this machine")
    first += [status_from(first_peer) for _ in range(BURST)]
    assert first == [401] * BURST + [429]

    # Another address has its own budget of failures.
    assert status_from(second_peer) == 401
    assert limited.exchange(subject, auth=limited.wrong).status_code == 401  # the test's own
