"""Rotation under traffic (issue 4): upstreams verifying minted tokens with a cached JWKS through
PyJWT's ``PyJWKClient`` never see a failure across two automatic rotations, and a token signed by
a key that has stopped signing keeps verifying until its ``exp``.

Two workers (two ``Services`` on one database, each served over real HTTP) mint alternately; the
keyring rotates by itself as the shared fake clock moves.

Time: the service clock is a FakeClock, but PyJWT checks ``exp`` and ``iat`` against the real
time. The fake clock therefore starts ``LEAD`` seconds in the past and stays at or below the real
time while tokens are minted, and tokens live ``TTL`` seconds, so every minted token has its
``iat`` in the real past and its ``exp`` in the real future: it is verified without any leeway.

The verifiers' JWKS cache runs on the same fake clock (its lifespan and PyJWT's refetch cooldown
are measured in service time), so that a cache lifespan of ``max-age`` seconds means the same
thing to the verifier as to the service.
"""

from __future__ import annotations

import re
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
import requests
from jwt import PyJWKClient

from sidecar.config import Settings
from sidecar.services import Services
from sidecar.web.app import create_app
from tests.conftest import (
    CODE_SEARCH,
    FakeClock,
    LiveServer,
    TestIdP,
    make_services,
)
from tests.functional.http.helpers import verify_as_upstream

ROTATE_EVERY = 60.0  # the shortest rotation the configuration accepts
PUBLISH_AHEAD = 20.0
REFRESH = 1.0
TTL = 600  # tokens.max_ttl and the code-search policy's ttl
LEEWAY = 30
LEAD = 400.0  # how far in the past the fake clock starts
STEP = 1.5  # fake seconds between two exchanges


@pytest.fixture
def config(config: dict[str, Any]) -> dict[str, Any]:
    config["tokens"] = {"algorithm": "ES256", "max_ttl": TTL, "leeway": LEEWAY}
    # Every exchange must mint (and sign with the key of the moment), not reuse a minted token.
    config["caches"] = {"minted_tokens": {"enabled": False}}
    config["keys"] = {
        "rotate_every": f"{int(ROTATE_EVERY)}s",
        "publish_ahead": f"{int(PUBLISH_AHEAD)}s",
        "retain_after": "11m",  # >= max_ttl + leeway
        "refresh_interval": f"{int(REFRESH)}s",
    }
    [code_search] = [
        p for p in config["policies"] if (p["client_id"], p["audience"]) == ("gateway", CODE_SEARCH)
    ]
    code_search["ttl"] = TTL
    return config


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(float(int(time.time() - LEAD)))


@dataclass
class Worker:
    services: Services
    server: LiveServer

    @property
    def jwks_uri(self) -> str:
        return f"{self.server.url}/.well-known/jwks.json"


@pytest.fixture
def workers(settings: Settings, clock: FakeClock) -> Iterator[list[Worker]]:
    """Two workers of one deployment: each its own engine and caches, one database."""
    started = []
    try:
        for _ in range(2):
            services = make_services(settings, clock=clock)
            started.append(Worker(services, LiveServer(create_app(settings, services))))
        yield started
    finally:
        for worker in started:
            worker.server.stop()
            worker.services.engine.dispose()


@pytest.fixture
def verifier_clock(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """PyJWKClient's cache lifespan and refetch cooldown measured on the service clock: the
    modules that read ``time.monotonic`` for them see the fake clock instead."""
    fake_time = types.SimpleNamespace(monotonic=clock)
    for module in (jwt.api_jwk, jwt.jwk_set_cache, jwt.jwks_client):
        monkeypatch.setattr(module, "time", fake_time)
    return clock


class CountingJWKClient(PyJWKClient):
    """PyJWKClient, counting its JWKS fetches."""

    fetches = 0

    def fetch_data(self) -> Any:
        self.fetches += 1
        return super().fetch_data()


def advertised_max_age(worker: Worker) -> int:
    response = requests.get(worker.jwks_uri, timeout=10)
    match = re.search(r"max-age=(\d+)", response.headers["Cache-Control"])
    assert match, response.headers["Cache-Control"]
    return int(match.group(1))


@dataclass(frozen=True)
class Minted:
    token: str
    kid: str
    exp: int


def test_cached_verifiers_never_fail_across_two_rotations(
    workers: list[Worker], verifier_clock: FakeClock, idp: TestIdP
) -> None:
    clock = verifier_clock
    t0 = clock.now
    max_age = advertised_max_age(workers[0])
    assert 0 < max_age < 30  # 30: PyJWKClient's default cooldown_duration, see below
    # PyJWT's defaults otherwise: an unknown kid triggers a refetch only when the last fetch is
    # at least cooldown_duration (30 s) old, which a cache living max_age (< 30 s) never is. So
    # this verifier can only know a new key from a scheduled refetch: publish-ahead at work.
    strict = CountingJWKClient(workers[1].jwks_uri, cache_jwk_set=True, lifespan=max_age)
    # A verifier that refetches at once when it meets an unknown kid.
    eager = CountingJWKClient(
        workers[0].jwks_uri, cache_jwk_set=True, lifespan=max_age, cooldown_duration=0
    )
    subject_token = idp.token()  # the real time governs its exp; it outlives the loop

    minted: list[Minted] = []
    failures: list[str] = []
    end = t0 + 2 * ROTATE_EVERY + 15  # two rotations: keys activating at t0 + 60 and t0 + 120
    while clock.now < end:
        worker = workers[len(minted) % 2]
        response = worker.server.exchange(subject_token)
        assert response.status_code == 200, response.text
        token = response.json()["access_token"]
        kid = jwt.get_unverified_header(token)["kid"]
        for name, client in (("strict", strict), ("eager", eager)):
            try:
                claims = verify_as_upstream(client, token)
            except jwt.PyJWTError as exc:
                failures.append(f"{name} at t0+{clock.now - t0}: kid {kid}: {exc!r}")
            else:
                assert claims["exp"] == int(clock.now) + TTL
        minted.append(Minted(token, kid, int(clock.now) + TTL))
        clock.advance(STEP)
    assert clock.now <= time.time()  # every token was minted in the real past

    assert failures == []
    # The cache was in use: a fetch per max-age (and, for the eager one, per new kid), not one
    # per token.
    assert strict.fetches <= (end - t0) / max_age + 1
    assert eager.fetches <= (end - t0) / max_age + 1 + 2
    signers = list(dict.fromkeys(m.kid for m in minted))  # in signing order
    assert len(signers) == 3, "two rotations"

    # The last token of each key that stopped signing verifies until its exp (the verifier's
    # cache has expired by then: it refetches the JWKS served at that moment).
    last_tokens = [next(m for m in reversed(minted) if m.kid == kid) for kid in signers[:2]]
    for old in last_tokens:
        clock.now = old.exp - 1
        assert verify_as_upstream(strict, old.token)["exp"] == old.exp

    # Once its retention has passed, the key is gone from every worker's JWKS.
    keyring = workers[0].services.keys.load()
    removes_at = 0.0
    for old in last_tokens:
        key = keyring.find(old.kid)
        assert key is not None
        assert key.removes_at is not None
        assert key.removes_at >= old.exp + LEEWAY  # published past exp, with the leeway
        removes_at = max(removes_at, key.removes_at)
    clock.now = removes_at
    for worker in workers:
        published = {jwk["kid"] for jwk in requests.get(worker.jwks_uri, timeout=10).json()["keys"]}
        assert published.isdisjoint(signers[:2])
    with pytest.raises(jwt.PyJWKClientError):
        verify_as_upstream(PyJWKClient(workers[0].jwks_uri), last_tokens[-1].token)
