"""The signing-key lifecycle in the running service, under a controlled clock (issue 4).

The real app over real HTTP, its keyring driven only by time: at each moment, which key signs
minted tokens, exactly which keys the JWKS publishes, the states `sidecar keys list` reports, the
JWKS caching header, and the keyring gauges of /metrics.
"""

from __future__ import annotations

import re
import time
from typing import Any

import jwt
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from sidecar.config import Settings, settings_from_mapping
from sidecar.keys.keyring import CURRENT, NEXT, PREVIOUS
from sidecar.services import Services
from sidecar.web.app import create_app
from tests.conftest import HOURLY_KEYS, FakeClock, LiveServer, TestIdP, make_services

ROTATE_EVERY = 3600.0
PUBLISH_AHEAD = 600.0
RETAIN_AFTER = 600.0
REFRESH = 1.0
# The first rotation is due when the current key is ROTATE_EVERY - PUBLISH_AHEAD old.
DUE_AFTER = ROTATE_EVERY - PUBLISH_AHEAD


@pytest.fixture
def config(config: dict[str, Any]) -> dict[str, Any]:
    config["tokens"] = {"algorithm": "ES256", "max_ttl": 300, "leeway": 30}
    config["keys"] = dict(HOURLY_KEYS)
    return config


@pytest.fixture
def services(clocked_services: Services) -> Services:
    """The service at T0 = clock.now: prepare() has generated its first key."""
    return clocked_services


def subject_token(idp: TestIdP, clock: FakeClock) -> str:
    # PyJWT checks the subject token's exp against the real time, the grant caps the minted
    # lifetime with it against the service clock: valid for both.
    return idp.token(exp=int(max(clock.now, time.time())) + 600)


def signing_kid(server: LiveServer, idp: TestIdP, clock: FakeClock) -> str:
    """The kid in the header of a token minted now."""
    response = server.exchange(subject_token(idp, clock))
    assert response.status_code == 200, response.text
    kid: str = jwt.get_unverified_header(response.json()["access_token"])["kid"]
    return kid


def get_jwks(server: LiveServer) -> requests.Response:
    response = requests.get(f"{server.url}/.well-known/jwks.json", timeout=10)
    assert response.status_code == 200
    return response


def published_kids(server: LiveServer) -> set[str]:
    return {jwk["kid"] for jwk in get_jwks(server).json()["keys"]}


def listed_states(services: Services) -> dict[str, str]:
    """What `sidecar keys list --json` reports: every stored key and its state now."""
    now = services.clock()
    return {key.kid: key.state(now) for key in services.keys.load().keys}


def at(clock: FakeClock, when: float, server: LiveServer, idp: TestIdP) -> tuple[str, set[str]]:
    """Move the service clock to ``when`` (more than keys.refresh_interval after the previous
    moment, so the keyring is re-read) and return (the signing kid, the published kids)."""
    assert when - clock.now >= REFRESH
    clock.now = when
    return signing_kid(server, idp, clock), published_kids(server)


def test_keys_are_published_ahead_sign_then_stay_published_after(
    server: LiveServer, services: Services, idp: TestIdP, clock: FakeClock
) -> None:
    t0 = clock.now
    first = services.signing_key().kid
    assert at(clock, t0 + 1, server, idp) == (first, {first})
    assert listed_states(services) == {first: CURRENT}

    # Just before a rotation is due nothing changes.
    assert at(clock, t0 + DUE_AFTER - 1, server, idp) == (first, {first})

    # Due: the next key is published, the current one still signs.
    signer, published = at(clock, t0 + DUE_AFTER, server, idp)
    [second] = published - {first}
    assert (signer, published) == (first, {first, second})
    assert listed_states(services) == {first: CURRENT, second: NEXT}
    second_key = services.keys.load().find(second)
    assert second_key is not None
    assert second_key.activates_at - clock.now >= PUBLISH_AHEAD

    assert at(clock, t0 + ROTATE_EVERY - 1, server, idp) == (first, {first, second})

    # The next key signs; the old one stays published for retain_after.
    assert at(clock, t0 + ROTATE_EVERY, server, idp) == (second, {first, second})
    assert listed_states(services) == {first: PREVIOUS, second: CURRENT}
    assert at(clock, t0 + ROTATE_EVERY + RETAIN_AFTER - 1, server, idp) == (
        second,
        {first, second},
    )

    # Then it is gone: out of the JWKS, and deleted from the keyring.
    assert at(clock, t0 + ROTATE_EVERY + RETAIN_AFTER, server, idp) == (second, {second})
    assert listed_states(services) == {second: CURRENT}


def test_rotations_repeat_every_rotate_every(
    server: LiveServer, services: Services, idp: TestIdP, clock: FakeClock
) -> None:
    t0 = clock.now
    signers = [services.signing_key().kid]
    for cycle in range(3):
        start = t0 + cycle * ROTATE_EVERY
        old = signers[-1]
        assert at(clock, start + DUE_AFTER - 1, server, idp)[1] == {old}

        _, published = at(clock, start + DUE_AFTER, server, idp)
        [new] = published - {old}
        assert new not in signers
        assert listed_states(services) == {old: CURRENT, new: NEXT}

        assert at(clock, start + ROTATE_EVERY, server, idp) == (new, {old, new})
        assert listed_states(services) == {old: PREVIOUS, new: CURRENT}
        signers.append(new)

    assert len(set(signers)) == 4


def test_every_worker_serves_the_same_jwks_within_the_refresh_interval(
    server: LiveServer, services: Services, settings: Settings, idp: TestIdP, clock: FakeClock
) -> None:
    # A second worker: its own process state (engine, caches), the same database and clock.
    other = make_services(settings, clock=clock)
    other_server = LiveServer(create_app(settings, other))
    try:
        t0 = clock.now
        first = services.signing_key().kid
        clock.now = t0 + DUE_AFTER - REFRESH / 2
        assert published_kids(other_server) == {first}  # loaded now, kept for REFRESH

        clock.now = t0 + DUE_AFTER
        rotated = published_kids(server)  # this worker performs the rotation
        assert len(rotated) == 2
        assert published_kids(other_server) == {first}  # still within its refresh interval

        clock.now = t0 + DUE_AFTER + REFRESH / 2
        assert published_kids(other_server) == rotated == published_kids(server)
        assert get_jwks(other_server).json() == get_jwks(server).json()

        clock.now = t0 + ROTATE_EVERY
        assert signing_kid(other_server, idp, clock) == signing_kid(server, idp, clock)
    finally:
        other_server.stop()
        other.engine.dispose()


# --- the JWKS caching header --------------------------------------------------------------------


def jwks_max_age(server: LiveServer) -> int:
    cache_control = get_jwks(server).headers["Cache-Control"]
    match = re.fullmatch(r"public, max-age=(\d+)", cache_control)
    assert match, cache_control
    return int(match.group(1))


def test_jwks_max_age_is_the_configured_bound(server: LiveServer, settings: Settings) -> None:
    max_age = jwks_max_age(server)

    assert max_age == settings.jwks_max_age == 300  # capped at five minutes
    assert max_age <= settings.keys.publish_ahead - settings.keys.refresh_interval


def test_jwks_max_age_leaves_time_to_refetch_before_a_key_signs(
    config: dict[str, Any], clock: FakeClock
) -> None:
    # A verifier that fetched the JWKS just before a worker loaded the next key must refetch it
    # before that key signs: max-age + refresh_interval <= publish_ahead.
    config["keys"].update(publish_ahead="2m", refresh_interval="5s")
    settings = settings_from_mapping(config, env={})
    services = make_services(settings, clock=clock)
    server = LiveServer(create_app(settings, services))
    try:
        max_age = jwks_max_age(server)
    finally:
        server.stop()
        services.engine.dispose()

    assert max_age == settings.jwks_max_age == 120 - 5


# --- Prometheus gauges --------------------------------------------------------------------------


def keyring_gauges(server: LiveServer) -> dict[str, Any]:
    response = requests.get(f"{server.url}/metrics", timeout=10)
    assert response.status_code == 200
    gauges: dict[str, Any] = {}
    for family in text_string_to_metric_families(response.text):
        if family.name == "sidecar_signing_keys_published":
            assert family.type == "gauge"
            gauges["published"] = {s.labels["state"]: s.value for s in family.samples}
        elif family.name in (
            "sidecar_signing_key_age_seconds",
            "sidecar_signing_key_next_rotation_timestamp_seconds",
        ):
            assert family.type == "gauge"
            [sample] = family.samples
            gauges[family.name] = sample.value
    return gauges


def test_metrics_report_the_keyring_at_a_known_time(server: LiveServer, clock: FakeClock) -> None:
    t0 = clock.now

    clock.now = t0 + 100
    assert keyring_gauges(server) == {
        "published": {"next": 0, "current": 1, "previous": 0},
        "sidecar_signing_key_age_seconds": 100,
        "sidecar_signing_key_next_rotation_timestamp_seconds": t0 + ROTATE_EVERY,
    }

    clock.now = t0 + DUE_AFTER + 10
    assert keyring_gauges(server) == {
        "published": {"next": 1, "current": 1, "previous": 0},
        "sidecar_signing_key_age_seconds": DUE_AFTER + 10,
        "sidecar_signing_key_next_rotation_timestamp_seconds": t0 + DUE_AFTER + 10 + PUBLISH_AHEAD,
    }

    rotated_at = t0 + DUE_AFTER + 10 + PUBLISH_AHEAD
    clock.now = rotated_at + 25
    assert keyring_gauges(server) == {
        "published": {"next": 0, "current": 1, "previous": 1},
        "sidecar_signing_key_age_seconds": 25,
        "sidecar_signing_key_next_rotation_timestamp_seconds": rotated_at + ROTATE_EVERY,
    }

    clock.now = rotated_at + RETAIN_AFTER
    assert keyring_gauges(server)["published"] == {"next": 0, "current": 1, "previous": 0}
