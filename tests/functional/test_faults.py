"""Failing dependencies and overload, against a real server (issue 6).

- The database unavailable or slow: 503 + ``Retry-After`` within a bounded time, ``/readyz`` not
  ready, and recovery without a restart (``sidecar serve`` under gunicorn, PostgreSQL behind a TCP
  proxy the test stops, restarts and slows down).
- An issuer's JWKS endpoint unreachable, slow or returning garbage: the cached keys keep verifying
  up to ``max_stale``, then 503; a slow scheduled refresh holds up no request; one malformed key
  does not discard the good ones (the app over real HTTP, with a controlled clock: staleness is
  a matter of time).
- Overload: the per-client rate limit answers 429 + ``Retry-After`` before any signature work.
- SIGTERM under load: in-flight requests finish with complete answers, readiness turns false,
  the process exits 0 (gunicorn, two workers, keep-alive clients).
"""

from __future__ import annotations

import runpy
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.engine import make_url

from sidecar.services import Services
from sidecar.serving.gunicorn import DEFAULT_CONFIG
from sidecar.store.db import make_engine
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
    base_config,
    exchange_params,
    live_service,
)
from tests.functional.http.helpers import assert_oauth_error
from tests.launcher import Served, start_serve
from tests.loopback import CountingHttpServer, TcpProxy, wait_for

# A dependency failure must be answered within this long (the database timeouts are 3 s).
ANSWER_BOUND = 5.0


def assert_retry_later(response: requests.Response) -> None:
    assert_oauth_error(response, 503, "temporarily_unavailable")
    assert int(response.headers["Retry-After"]) >= 1
    assert "access_token" not in response.text


def assert_rate_limited(response: requests.Response) -> None:
    # RFC 6585 §4, with the retryable OAuth error code. (Not assert_oauth_error: its catalogue
    # of fixed descriptions lacks this one.)
    assert response.status_code == 429, response.text
    assert response.json() == {
        "error": "temporarily_unavailable",
        "error_description": "Too many requests.",
    }
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Pragma"] == "no-cache"
    assert int(response.headers["Retry-After"]) >= 1


# --- sidecar serve, as a process ----------------------------------------------------------------


class Sidecar(Served):
    """``sidecar serve`` started by the launcher, with the requests these tests send."""

    def exchange(
        self, subject_token: str, timeout: float = 10, session: requests.Session | None = None
    ) -> requests.Response:
        return (session or requests).post(
            f"{self.url}/token",
            data=exchange_params(subject_token),
            auth=("gateway", GATEWAY_SECRET),
            timeout=timeout,
        )

    def ready(self) -> requests.Response:
        return requests.get(f"{self.url}/readyz", timeout=10)


def start_sidecar(
    config: dict[str, Any], directory: Path, workers: int = 2, server: str = "granian"
) -> Sidecar:
    """`sidecar serve` (granian, or gunicorn) on a free loopback port, once /readyz says ready."""
    served = start_serve(directory, config, "--server", server, workers=workers)
    return Sidecar(**{f.name: getattr(served, f.name) for f in fields(Served)})


# --- the database: unavailable, slow, back ------------------------------------------------------


@pytest.fixture
def proxied_postgres(postgres_url: str) -> Iterator[tuple[str, TcpProxy]]:
    """The test's PostgreSQL database, reached through a proxy the test controls."""
    url = make_url(postgres_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    proxy.start()
    yield url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False), proxy
    proxy.stop()


@pytest.fixture
def sidecar_on_proxied_postgres(
    proxied_postgres: tuple[str, TcpProxy], tmp_path: Path, idp_rsa_key: rsa.RSAPrivateKey
) -> Iterator[tuple[Sidecar, TcpProxy, TestIdP]]:
    database_url, proxy = proxied_postgres
    idp = TestIdP(tmp_path, idp_rsa_key)
    sidecar = start_sidecar(base_config(idp, ClientKeys(), database_url), tmp_path)
    yield sidecar, proxy, idp
    proxy.stop()  # releases anything held, so the workers are not stuck at exit
    sidecar.kill()


def timed(call: Any) -> tuple[Any, float]:
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def serves_again(sidecar: Sidecar, idp: TestIdP) -> bool:
    # Several in a row: each of the two workers must have recovered, not only one.
    try:
        return all(sidecar.exchange(idp.token(), timeout=5).status_code == 200 for _ in range(6))
    except requests.RequestException:
        return False


@pytest.mark.postgres
def test_database_down_is_503_then_recovers_by_itself(
    sidecar_on_proxied_postgres: tuple[Sidecar, TcpProxy, TestIdP],
) -> None:
    sidecar, proxy, idp = sidecar_on_proxied_postgres
    # Kept-alive connections, opened one after the other: the balanced workers spread them (each
    # new one goes to the worker holding the fewest), and each stays with its worker.
    sessions = [requests.Session() for _ in range(4)]
    for session in sessions:
        assert sidecar.exchange(idp.token(), session=session).status_code == 200

    proxy.stop()  # PostgreSQL is gone: every connection is refused

    # Audit records are written off the hot path, so a grant or two may still be answered by a
    # worker (queued, and written when the database is back) until its writer finds the database
    # gone; from then on that worker refuses every grant, each answer within the bound.
    def refused(session: requests.Session) -> bool:
        response = sidecar.exchange(idp.token(), timeout=ANSWER_BOUND + 2, session=session)
        return response.status_code == 503

    assert wait_for(lambda: all(refused(session) for session in sessions), timeout=4 * ANSWER_BOUND)
    for _ in range(2):
        for session in sessions:
            response, took = timed(
                lambda s=session: sidecar.exchange(idp.token(), timeout=ANSWER_BOUND + 2, session=s)
            )
            assert_retry_later(response)
            assert took < ANSWER_BOUND
    for session in sessions:
        session.close()
    ready = sidecar.ready()
    assert ready.status_code == 503
    assert ready.json()["checks"]["database"] is False
    # Operators see why: the database's errors, counted by kind over the workers.
    scraped = requests.get(f"{sidecar.url}/metrics", timeout=10).text
    counted = [
        sample.value
        for family in text_string_to_metric_families(scraped)
        for sample in family.samples
        if sample.name == "sidecar_database_errors_total"
        and sample.labels == {"kind": "OperationalError"}
    ]
    assert counted, scraped
    assert counted[0] > 0

    proxy.start()  # PostgreSQL is back, on the same address

    assert wait_for(lambda: serves_again(sidecar, idp), timeout=10), sidecar.log()
    assert sidecar.ready().status_code == 200


@pytest.mark.postgres
def test_a_slow_database_is_503_within_the_bound_not_a_hang(
    sidecar_on_proxied_postgres: tuple[Sidecar, TcpProxy, TestIdP],
) -> None:
    sidecar, proxy, idp = sidecar_on_proxied_postgres
    # Requests on new connections reach both workers: each holds pooled database connections.
    assert all(sidecar.exchange(idp.token()).status_code == 200 for _ in range(8))

    # Every byte to and from PostgreSQL now takes longer than the statement and connect
    # timeouts (3 s), on the pooled connections as on new ones.
    proxy.slow(15)

    # The hot path never waits on the database: every request is answered within the bound,
    # granted while the audit writer's batch is still in flight, and refused (503) once the
    # writes have timed out, until the database is fast again.
    refused_in_a_row = 0
    deadline = time.monotonic() + 6 * ANSWER_BOUND
    while refused_in_a_row < 6:
        assert time.monotonic() < deadline, "grants still answered with audit writes failing"
        try:
            response, took = timed(lambda: sidecar.exchange(idp.token(), timeout=ANSWER_BOUND + 2))
        except requests.Timeout:
            pytest.fail(f"no answer within {ANSWER_BOUND + 2}s: a slow database holds /token up")
        assert took < ANSWER_BOUND
        if response.status_code == 200:
            refused_in_a_row = 0
        else:
            assert_retry_later(response)
            refused_in_a_row += 1

    proxy.fast()
    assert wait_for(lambda: serves_again(sidecar, idp), timeout=10), sidecar.log()


# --- the issuer's keys: unreachable, slow, garbage ----------------------------------------------

REFRESH, MIN_REFETCH, MAX_STALE, FETCH_TIMEOUT = 60, 30, 300, 1.0


@dataclass
class IssuerFault:
    server: LiveServer
    services: Services
    jwks: CountingHttpServer
    clock: FakeClock
    idp: TestIdP


def keys_served_by_the_test(
    config: dict[str, Any], idp: TestIdP, **issuer_settings: Any
) -> Iterator[IssuerFault]:
    """The app of ``config`` over real HTTP on a clock the test moves, its trusted issuer's JWKS
    (``issuer_settings`` added to the issuer's) served by a loopback server that counts the
    fetches."""
    jwks = CountingHttpServer(idp.public_jwks())
    issuer = config["trusted_issuers"][0]
    del issuer["jwks_file"]
    issuer.update(jwks_uri=f"{jwks.url}/jwks.json", **issuer_settings)
    clock = FakeClock()
    try:
        with live_service(config, clock=clock) as (services, server):
            yield IssuerFault(server, services, jwks, clock, idp)
    finally:
        jwks.stop()


@pytest.fixture
def issuer_fault(config: dict[str, Any], idp: TestIdP) -> Iterator[IssuerFault]:
    """The app over real HTTP, its trusted issuer's JWKS served by a loopback server the test
    breaks, and a clock the test moves (PyJWT still checks exp against the real time)."""
    yield from keys_served_by_the_test(
        config,
        idp,
        refresh_interval=REFRESH,
        min_refetch_interval=MIN_REFETCH,
        max_stale=MAX_STALE,
        fetch_timeout=FETCH_TIMEOUT,
    )


def refresh_failed(logs: pytest.LogCaptureFixture) -> bool:
    return any(r.name == "sidecar.jwks" and "unavailable" in r.getMessage() for r in logs.records)


GARBAGE = {
    "connection-dropped": (0, {}),
    "http-503": (503, {"error": "down"}),
    "not-json": (200, b"<html>Service Unavailable</html>"),
    "not-a-jwk-set": (200, {"keys": "none"}),
    "empty-set": (200, {"keys": []}),
    "only-malformed-keys": (200, {"keys": [{"kty": "RSA", "kid": "rsa-1", "n": "!", "e": "AQAB"}]}),
}


@pytest.mark.parametrize("failure", sorted(GARBAGE))
def test_cached_keys_verify_while_the_issuer_fails_then_503_after_max_stale(
    issuer_fault: IssuerFault, captured_logs: pytest.LogCaptureFixture, failure: str
) -> None:
    fault, idp = issuer_fault, issuer_fault.idp
    assert fault.server.exchange(idp.token()).status_code == 200
    assert fault.jwks.count == 1

    fault.jwks.status, fault.jwks.document = GARBAGE[failure]
    fault.clock.advance(REFRESH + 1)  # a scheduled refresh is due, and fails
    assert fault.server.exchange(idp.token()).status_code == 200
    assert wait_for(lambda: refresh_failed(captured_logs), timeout=5)
    assert fault.jwks.count == 2
    # Within max_stale, the cached keys go on verifying.
    fault.clock.advance(MAX_STALE - REFRESH - 2)
    assert fault.server.exchange(idp.token()).status_code == 200

    fault.clock.advance(2)  # past max_stale since the last good fetch
    subject = idp.token()
    response = fault.server.exchange(subject)

    assert_retry_later(response)
    assert subject not in response.text
    denial = audit_rows(fault.services)[-1]
    assert (denial.decision, denial.error) == ("denied", "temporarily_unavailable")

    # The issuer answers again: the next refresh (at most min_refetch_interval after the last
    # attempt) brings fresh keys, without a restart.
    fault.jwks.status, fault.jwks.document = 200, idp.public_jwks()
    fault.clock.advance(MIN_REFETCH)
    assert wait_for(lambda: fault.server.exchange(idp.token()).status_code == 200, timeout=5)


def test_a_slow_scheduled_refresh_holds_up_no_request(issuer_fault: IssuerFault) -> None:
    fault, idp = issuer_fault, issuer_fault.idp
    assert fault.server.exchange(idp.token()).status_code == 200

    fault.jwks.delay = 30  # far longer than fetch_timeout: the fetch will time out
    fault.clock.advance(REFRESH + 1)
    response, took = timed(lambda: fault.server.exchange(idp.token()))
    assert response.status_code == 200, response.text
    assert took < 1.0
    assert wait_for(lambda: fault.jwks.in_flight == 1, timeout=2)

    # While the refresh waits on the issuer, requests are answered at once from the cache.
    for _ in range(3):
        response, took = timed(lambda: fault.server.exchange(idp.token()))
        assert response.status_code == 200, response.text
        assert took < 1.0
    assert fault.jwks.in_flight == 1
    assert fault.jwks.count == 2  # one refresh, not one per request

    # And once it has timed out, the cached keys still serve.
    time.sleep(FETCH_TIMEOUT + 0.2)
    assert fault.server.exchange(idp.token()).status_code == 200


def test_one_malformed_key_does_not_discard_the_good_ones(
    issuer_fault: IssuerFault,
) -> None:
    fault, idp = issuer_fault, issuer_fault.idp
    good = idp.public_jwks()["keys"]
    malformed = [
        {"kty": "RSA", "kid": "broken-rsa", "n": "!!not-base64!!", "e": "AQAB"},
        {"kty": "EC", "kid": "broken-ec", "crv": "P-256", "x": "AAAA", "y": "AAAA"},
        {"kty": "XYZ", "kid": "unknown-type"},
        {"kty": "RSA", "n": good[0]["n"], "e": "AQAB"},  # no kid
        "not-an-object",
    ]
    fault.jwks.document = {"keys": [malformed[0], good[0], *malformed[1:], good[1]]}

    assert fault.server.exchange(idp.token(kid="rsa-1")).status_code == 200
    assert fault.server.exchange(idp.token(kid="ec-1")).status_code == 200

    # A refresh to a set where the RSA key is now the malformed one keeps the good EC key.
    fault.jwks.document = {"keys": [{**good[0], "n": "!!"}, good[1]]}
    fault.clock.advance(REFRESH + 1)
    assert fault.server.exchange(idp.token(kid="ec-1")).status_code == 200  # starts the refresh
    subject = idp.token(kid="rsa-1")
    assert wait_for(lambda: fault.server.exchange(subject).status_code == 400, timeout=3)
    assert_oauth_error(fault.server.exchange(subject), 400, "invalid_request", subject)
    assert fault.server.exchange(idp.token(kid="ec-1")).status_code == 200
    assert fault.jwks.count == 2


# --- overload: the rate limit -------------------------------------------------------------------


@pytest.fixture
def rate_limited(
    config: dict[str, Any], idp: TestIdP, client_keys: ClientKeys
) -> Iterator[IssuerFault]:
    """rate_limit {per_second: 5, burst: 5}; the issuer's keys behind a counting server, not
    fetched yet, so that any signature work on a subject token shows as a fetch; a frozen
    clock, so that no bucket refills while the test runs."""
    config["rate_limit"] = {"per_second": 5, "burst": 5}
    yield from keys_served_by_the_test(config, idp)


def test_the_request_over_the_burst_gets_429_before_any_signature_work(
    rate_limited: IssuerFault, client_keys: ClientKeys
) -> None:
    limited, idp = rate_limited, rate_limited.idp
    # Five authenticated requests per client, refused before the subject token is looked at,
    # use up both bursts (only requests that authenticate as a client spend its budget).
    unsupported = "urn:example:unsupported"
    for _ in range(5):
        response = limited.server.exchange(idp.token(), subject_token_type=unsupported)
        assert response.json()["error"] == "invalid_request"
        response = limited.server.exchange(
            idp.token(),
            subject_token_type=unsupported,
            auth=None,
            client_assertion_type=CLIENT_ASSERTION_TYPE,
            client_assertion=client_keys.assertion(),
        )
        assert response.json()["error"] == "invalid_request"
    assert limited.jwks.count == 0

    subject, assertion = idp.token(), client_keys.assertion()
    over = [
        limited.server.exchange(subject),
        limited.server.exchange(
            subject,
            auth=None,
            client_assertion_type=CLIENT_ASSERTION_TYPE,
            client_assertion=assertion,
        ),
    ]

    for response in over:
        assert_rate_limited(response)
        assert subject not in response.text
    # Neither the subject token (its issuer's keys were never fetched) nor the client
    # assertion (its jti was not spent) was verified.
    assert limited.jwks.count == 0
    rows = audit_rows(limited.services)[-2:]
    assert [(r.decision, r.error, r.reason) for r in rows] == [
        ("denied", "temporarily_unavailable", "rate limit")
    ] * 2
    assert [(r.client_id, r.subject_token_sha256) for r in rows] == [(None, None)] * 2

    limited.clock.advance(int(over[0].headers["Retry-After"]))
    assert limited.server.exchange(subject).status_code == 200
    assert limited.jwks.count == 1  # the same token did need the keys
    limited.clock.advance(1)
    granted = limited.server.exchange(
        subject, auth=None, client_assertion_type=CLIENT_ASSERTION_TYPE, client_assertion=assertion
    )
    assert granted.status_code == 200, granted.text  # the assertion was never consumed


def test_a_per_client_rate_limit_applies_to_that_client_only(
    config: dict[str, Any], idp: TestIdP, client_keys: ClientKeys
) -> None:
    config["rate_limit"] = {"per_second": 5, "burst": 5}
    [gateway] = [c for c in config["clients"] if c["client_id"] == "gateway"]
    gateway["rate_limit"] = {"per_second": 1, "burst": 2}
    with live_service(config, clock=FakeClock()) as (_, server):
        gateway_statuses = [server.exchange(idp.token()).status_code for _ in range(3)]
        other_statuses = [
            server.exchange(
                idp.token(),
                auth=None,
                client_assertion_type=CLIENT_ASSERTION_TYPE,
                client_assertion=client_keys.assertion(),
            ).status_code
            for _ in range(6)
        ]
        # Names no configured client: the shared bucket of unknown clients, not gateway's.
        unknown = server.exchange(idp.token(), auth=("nobody", "x")).status_code

    assert gateway_statuses == [200, 200, 429]  # its own burst of 2
    assert other_statuses == [200] * 5 + [429]  # the top-level burst of 5
    assert unknown == 401


# --- SIGTERM under load -------------------------------------------------------------------------


@dataclass
class Outcome:
    status: int | None = None
    error: str | None = None
    sent_at: float = 0.0
    answered_at: float = 0.0


def load_loop(url: str, idp_tokens: list[str], stop_at: float, outcomes: list[Outcome]) -> None:
    """One keep-alive client posting exchanges back to back until ``stop_at``."""
    session = requests.Session()
    index = 0
    while time.monotonic() < stop_at:
        outcome = Outcome(sent_at=time.monotonic())
        try:
            response = session.post(
                f"{url}/token",
                data=exchange_params(idp_tokens[index % len(idp_tokens)]),
                auth=("gateway", GATEWAY_SECRET),
                timeout=10,
            )
            outcome.status, outcome.answered_at = response.status_code, time.monotonic()
            # A complete answer: the whole body arrived (requests checks Content-Length) and is
            # a token response, or the error says what went wrong.
            body = response.json()
            if response.status_code == 200:
                claims = jwt.decode(body["access_token"], options={"verify_signature": False})
                assert claims["iss"] == SIDECAR_ISSUER
        except requests.ConnectionError as exc:
            # A new request after the listener closed, or on a kept-alive connection the server
            # closed: never answered, so never cut off.
            outcome.error = f"connection: {type(exc).__name__}"
            session.close()
            session = requests.Session()
            time.sleep(0.05)
        except Exception as exc:  # a truncated body, bad JSON, a broken token
            outcome.error = f"broken: {type(exc).__name__}: {exc}"
        outcomes.append(outcome)
        index += 1
    session.close()


@pytest.mark.parametrize("server", ["gunicorn", "granian"])
def test_sigterm_under_load_finishes_every_answered_request_and_exits_0(
    tmp_path: Path, idp_rsa_key: rsa.RSAPrivateKey, server: str
) -> None:
    idp = TestIdP(tmp_path, idp_rsa_key)
    config = base_config(idp, ClientKeys(), f"sqlite:///{tmp_path / 'sidecar.db'}")
    sidecar = start_sidecar(config, tmp_path, server=server)
    try:
        tokens = [idp.token() for _ in range(20)]
        probe = requests.Session()  # a kept-alive connection to watch readiness through
        assert probe.get(f"{sidecar.url}/readyz", timeout=5).status_code == 200

        outcomes: list[Outcome] = []
        stop_at = time.monotonic() + 2.0
        threads = [
            threading.Thread(target=load_loop, args=(sidecar.url, tokens, stop_at, outcomes))
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        time.sleep(0.8)
        terminated_at = time.monotonic()
        sidecar.process.send_signal(signal.SIGTERM)
        # Through its kept-alive connection, a stopping worker still answers for a moment
        # (with Connection: close): it must say it is not ready.
        readiness = _readiness(probe, f"{sidecar.url}/readyz")
        for thread in threads:
            thread.join(15)
        status = sidecar.process.wait(timeout=30)
    finally:
        sidecar.kill()

    log = sidecar.log()
    assert status == 0, log
    # Every grant the workers made (each is queued for the audit trail before it is answered, and
    # the queue is written when the worker exits) reached its client and its audit row: none was
    # cut off between the audit record and the last byte of the response, none lost at exit.
    engine = make_engine(config["database_url"])
    try:
        with engine.connect() as connection:
            granted = connection.scalar(
                text("SELECT count(*) FROM audit_events WHERE decision = 'granted'")
            )
    finally:
        engine.dispose()
    broken = [o.error for o in outcomes if o.error and o.error.startswith("broken")]
    assert broken == [], broken
    answered = [o for o in outcomes if o.status is not None]
    assert all(o.status == 200 for o in answered), {o.status for o in answered}
    # Requests in flight (or arriving on kept-alive connections) when SIGTERM came were answered.
    assert any(o.answered_at > terminated_at for o in answered)
    assert len(answered) >= 20, len(answered)
    assert granted == len(answered)
    if server == "gunicorn":  # granian has no draining hook
        assert readiness in (503, None), readiness  # None: that connection was closed first
    assert "Traceback" not in log


def _readiness(session: requests.Session, url: str) -> int | None:
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        try:
            status = session.get(url, timeout=2).status_code
        except requests.ConnectionError:
            return None
        if status == 503:
            return status
        time.sleep(0.02)
    return 200


def test_sigterm_turns_readiness_false_in_the_worker(services: Services) -> None:
    # The gunicorn hook itself, on the real app: SIGTERM sets draining, /readyz answers 503,
    # and gunicorn's own handler still runs.
    hooks = runpy.run_path(str(DEFAULT_CONFIG))
    app = create_app(services.settings, services)
    calls: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    try:
        hooks["post_worker_init"](type("Worker", (), {"wsgi": app})())
        assert app.test_client().get("/readyz").status_code == 200
        signal.raise_signal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)

    assert calls == [signal.SIGTERM]
    response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.get_json()["checks"]["serving"] is False
