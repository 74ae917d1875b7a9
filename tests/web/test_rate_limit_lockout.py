"""The rate limit of POST /token over real HTTP: a client's budget is spent only by requests that
authenticated as it, whatever the method (client_secret_basic, client_secret_post,
private_key_jwt), so that nobody can lock a client out by claiming its id; failed
authentications are limited per peer address, and over that budget are answered 429 instead of
401 while correct requests from the same address still succeed."""

from __future__ import annotations

import base64
import http.client
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.config import settings_from_mapping
from sidecar.services import Services
from sidecar.web.app import create_app
from tests.conftest import (
    CLIENT_ASSERTION_TYPE,
    GATEWAY_SECRET,
    SIDECAR_ISSUER,
    ClientKeys,
    FakeClock,
    LiveServer,
    TestIdP,
    audit_rows,
    make_services,
)
from tests.web.helpers import assert_oauth_error, exchange_form, post_token

BURST = 3
WRONG_SECRET = "not-the-secret-" + "z" * 24
FLOOD = 120


@dataclass
class Limited:
    server: LiveServer
    services: Services
    clock: FakeClock


@pytest.fixture
def limited(config: dict[str, Any]) -> Iterator[Limited]:
    """rate_limit {per_second: 1, burst: 3}, with a frozen clock: no bucket refills unless the
    test advances it."""
    config["rate_limit"] = {"per_second": 1, "burst": BURST}
    clock = FakeClock()
    services = make_services(settings_from_mapping(config, env={}), clock=clock)
    server = LiveServer(create_app(services.settings, services))
    yield Limited(server, services, clock)
    server.stop()
    services.close()


def assert_rate_limited(response: requests.Response, *never_echoed: str) -> int:
    assert_oauth_error(response, 429, "temporarily_unavailable", *never_echoed)
    assert "WWW-Authenticate" not in response.headers
    retry_after = int(response.headers["Retry-After"])
    assert retry_after >= 1
    return retry_after


def forged_assertion(client_keys: ClientKeys) -> str:
    """Claims jwt-gateway, with its kid, but signed with a key that is not the client's."""
    now = int(time.time())
    claims = {
        "iss": client_keys.client_id,
        "sub": client_keys.client_id,
        "aud": SIDECAR_ISSUER,
        "iat": now,
        "exp": now + 60,
        "jti": f"forged-{time.monotonic_ns()}",
    }
    impostor = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode(claims, impostor, algorithm="ES256", headers={"kid": "client-1"})


def assertion_form(subject: str, assertion: str) -> list[tuple[str, str]]:
    return exchange_form(
        subject, client_assertion_type=CLIENT_ASSERTION_TYPE, client_assertion=assertion
    )


# What each authentication method sends for its client, as (form, Basic auth): the correct
# credentials or, with wrong=True, a wrong secret or a forged assertion.
Sent = tuple[list[tuple[str, str]], tuple[str, str] | None]
Send = Callable[..., Sent]


def _basic(subject: str, _keys: ClientKeys, *, wrong: bool = False) -> Sent:
    return exchange_form(subject), ("gateway", WRONG_SECRET if wrong else GATEWAY_SECRET)


def _post(subject: str, _keys: ClientKeys, *, wrong: bool = False) -> Sent:
    secret = WRONG_SECRET if wrong else GATEWAY_SECRET
    return exchange_form(subject, client_id="gateway", client_secret=secret), None


def _private_key_jwt(subject: str, keys: ClientKeys, *, wrong: bool = False) -> Sent:
    return assertion_form(subject, forged_assertion(keys) if wrong else keys.assertion()), None


def post(server: LiveServer, sent: Sent) -> requests.Response:
    form, auth = sent
    return post_token(server, form, auth=auth)


METHODS: dict[str, Send] = {
    "client_secret_basic": _basic,
    "client_secret_post": _post,
    "private_key_jwt": _private_key_jwt,
}


# --- (a) no lock-out by claiming a client's id ----------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_failures_claiming_a_client_do_not_lock_it_out(
    limited: Limited, idp: TestIdP, client_keys: ClientKeys, method: str
) -> None:
    send = METHODS[method]
    subject = idp.token()
    with requests.Session() as session:
        statuses = []
        for _ in range(FLOOD):
            form, auth = send(subject, client_keys, wrong=True)
            statuses.append(
                session.post(limited.server.token_url, data=form, auth=auth, timeout=10).status_code
            )
    # The attacker's own budget of failures, then 429: never a refusal of the real client.
    assert statuses == [401] * BURST + [429] * (FLOOD - BURST)

    # The real client, from the same address, still has its whole burst.
    granted = [post(limited.server, send(idp.token(), client_keys)) for _ in range(BURST)]
    assert [r.status_code for r in granted] == [200] * BURST, granted[-1].text


def test_the_lock_out_denials_are_audited_without_a_client(limited: Limited, idp: TestIdP) -> None:
    subject = idp.token()
    for _ in range(BURST + 2):
        limited.server.exchange(subject, auth=("gateway", WRONG_SECRET))
    assert limited.server.exchange(idp.token()).status_code == 200

    rows = audit_rows(limited.services)
    assert [(r.decision, r.error, r.client_id) for r in rows] == [
        ("denied", "invalid_client", None)
    ] * BURST + [("denied", "temporarily_unavailable", None)] * 2 + [("granted", None, "gateway")]
    assert all(
        (r.reason or "").startswith("rate limit of failed authentication") for r in rows[3:5]
    )


# --- (b) every authentication method is limited ---------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_every_authentication_method_is_rate_limited(
    limited: Limited, idp: TestIdP, client_keys: ClientKeys, method: str
) -> None:
    send = METHODS[method]
    subject = idp.token()
    responses = [post(limited.server, send(subject, client_keys)) for _ in range(BURST + 2)]

    assert [r.status_code for r in responses] == [200] * BURST + [429] * 2
    retry_after = assert_rate_limited(responses[-1], subject)

    limited.clock.advance(retry_after)
    again = post(limited.server, send(subject, client_keys))
    assert again.status_code == 200, again.text


def test_a_refused_client_assertion_is_not_spent(
    limited: Limited, idp: TestIdP, client_keys: ClientKeys
) -> None:
    # Refused before the assertion is verified (its jti is not remembered), so it stays usable.
    for _ in range(BURST):
        form = assertion_form(idp.token(), client_keys.assertion())
        response = post_token(limited.server, form, auth=None)
        assert response.status_code == 200, response.text
    assertion = client_keys.assertion()
    assert_rate_limited(
        post_token(limited.server, assertion_form(idp.token(), assertion), auth=None)
    )

    limited.clock.advance(1)
    response = post_token(limited.server, assertion_form(idp.token(), assertion), auth=None)
    assert response.status_code == 200, response.text


def test_clients_have_separate_budgets(
    limited: Limited, idp: TestIdP, client_keys: ClientKeys
) -> None:
    for _ in range(BURST):
        assert limited.server.exchange(idp.token()).status_code == 200
    assert limited.server.exchange(idp.token()).status_code == 429
    assert post(limited.server, _private_key_jwt(idp.token(), client_keys)).status_code == 200


def test_a_client_is_charged_even_when_its_claim_cannot_be_read(
    limited: Limited, idp: TestIdP
) -> None:
    # Two spaces after "Basic": the cheap pre-authentication reading sees no client, the
    # authenticator still accepts it; the budget charged is the one of the client proven.
    credentials = base64.b64encode(f"gateway:{GATEWAY_SECRET}".encode()).decode()
    headers = {"Authorization": f"Basic  {credentials}"}
    statuses = [
        post_token(limited.server, exchange_form(idp.token()), auth=None, headers=headers)
        for _ in range(BURST + 1)
    ]
    assert [r.status_code for r in statuses] == [200] * BURST + [429]
    assert_rate_limited(statuses[-1])
    assert limited.server.exchange(idp.token()).status_code == 429  # the same, gateway's, bucket

    row = audit_rows(limited.services)[-2]
    assert (row.error, row.reason, row.client_id) == (
        "temporarily_unavailable",
        "rate limit",
        "gateway",
    )


# --- (c) failures per peer: 429 instead of 401, never for a correct request -----------------------


def test_failures_over_the_peer_budget_get_429_and_correct_requests_still_pass(
    limited: Limited, idp: TestIdP, client_keys: ClientKeys
) -> None:
    subject = idp.token()
    failures = [
        limited.server.exchange(subject, auth=("gateway", WRONG_SECRET)) for _ in range(BURST)
    ]
    for response in failures:
        assert_oauth_error(response, 401, "invalid_client", subject, WRONG_SECRET)

    over = limited.server.exchange(subject, auth=("gateway", WRONG_SECRET))
    retry_after = assert_rate_limited(over, subject, WRONG_SECRET)
    # Whatever the failing request claims, from this address: an unknown id, another client.
    assert_rate_limited(limited.server.exchange(subject, auth=("ghost-client", WRONG_SECRET)))
    assert_rate_limited(post(limited.server, _private_key_jwt(subject, client_keys, wrong=True)))

    # A correct request from the same address, by any method, is answered.
    assert limited.server.exchange(idp.token()).status_code == 200
    assert post(limited.server, _private_key_jwt(idp.token(), client_keys)).status_code == 200
    # ... and does not give the failing ones their budget back.
    assert_rate_limited(limited.server.exchange(subject, auth=("gateway", WRONG_SECRET)))

    limited.clock.advance(retry_after)
    again = limited.server.exchange(subject, auth=("gateway", WRONG_SECRET))
    assert_oauth_error(again, 401, "invalid_client", subject, WRONG_SECRET)


def _post_from(
    source: str, server: LiveServer, form: list[tuple[str, str]], auth: tuple[str, str]
) -> int:
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10, source_address=(source, 0))
    try:
        credentials = base64.b64encode(":".join(auth).encode()).decode()
        connection.request(
            "POST",
            "/token",
            body=urlencode(form),
            headers={
                "Content-Type": "application/x-www-form-urlencoded",
                "Authorization": f"Basic {credentials}",
            },
        )
        return connection.getresponse().status
    finally:
        connection.close()


def test_failure_budgets_are_per_peer_address(limited: Limited, idp: TestIdP) -> None:
    subject = idp.token()
    wrong = ("gateway", WRONG_SECRET)
    try:
        first = [_post_from("127.0.0.2", limited.server, exchange_form(subject), wrong)]
    except OSError:
        pytest.skip("cannot send from 127.0.0.2 on this machine")
    first += [
        _post_from("127.0.0.2", limited.server, exchange_form(subject), wrong) for _ in range(BURST)
    ]
    assert first == [401] * BURST + [429]

    # Another address has its own budget of failures.
    assert _post_from("127.0.0.3", limited.server, exchange_form(subject), wrong) == 401
    assert limited.server.exchange(subject, auth=wrong).status_code == 401  # from 127.0.0.1
