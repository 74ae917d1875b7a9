"""Rate limits shared through Redis (sidecar/ratelimit.py ``RedisBuckets``), against the real
Redis of SIDECAR_TEST_REDIS_URL: several limiters (as several workers and replicas have) share
one budget, charges are atomic, idle buckets expire, and when Redis does not answer each
``redis.on_failure`` does what it says."""

from __future__ import annotations

import secrets
import time
from typing import Any

import pytest
import redis

from sidecar.config import Settings, settings_from_mapping
from sidecar.errors import TemporarilyUnavailableError
from sidecar.ratelimit import RateLimiter
from tests.unit.support import race

BURST = 5


def settings_with_redis(
    config: dict[str, Any], url: str, prefix: str, **redis_options: Any
) -> Settings:
    config = {
        **config,
        "rate_limit": {"per_second": 0.5, "burst": BURST},
        "redis": {"url": url, "key_prefix": prefix, **redis_options},
    }
    return settings_from_mapping(config, env={})


@pytest.fixture
def prefix(redis_url: str) -> Any:
    """A key prefix of this test's own, and its keys removed afterwards."""
    chosen = f"sidecar-test:{secrets.token_hex(6)}:"
    yield chosen
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{chosen}*"):
        client.delete(key)
    client.close()


def test_workers_share_one_budget(config: dict[str, Any], redis_url: str, prefix: str) -> None:
    settings = settings_with_redis(config, redis_url, prefix)
    workers = [RateLimiter(settings, time.time) for _ in range(3)]
    try:
        outcomes = [workers[i % 3].take("gateway") for i in range(BURST + 2)]
    finally:
        for worker in workers:
            worker.close()

    assert workers[0].shared
    assert outcomes[:BURST] == [None] * BURST
    assert all(wait is not None and wait >= 1 for wait in outcomes[BURST:])


def test_a_refused_client_is_refused_by_peek_without_a_round_trip(
    config: dict[str, Any], redis_url: str, prefix: str
) -> None:
    limiter = RateLimiter(settings_with_redis(config, redis_url, prefix), time.time)
    try:
        for _ in range(BURST):
            assert limiter.take("gateway") is None
        assert limiter.peek("gateway") is None  # nothing known to be empty yet
        assert limiter.take("gateway") is not None
        wait = limiter.peek("gateway")
    finally:
        limiter.close()
    assert wait is not None
    assert wait >= 1


def test_concurrent_charges_never_overspend(
    config: dict[str, Any], redis_url: str, prefix: str
) -> None:
    settings = settings_with_redis(config, redis_url, prefix)
    limiters = [RateLimiter(settings, time.time) for _ in range(4)]

    def charge(limiter: RateLimiter) -> list[bool]:
        return [limiter.take("gateway") is None for _ in range(10)]

    try:
        charged = race(limiters, charge, timeout=30)
    finally:
        for limiter in limiters:
            limiter.close()
    allowed = [each for charges in charged for each in charges]
    assert len(allowed) == 40
    # The burst, plus at most the refill of the seconds the test took (0.5 per second).
    assert BURST <= allowed.count(True) <= BURST + 2


def test_failures_are_counted_per_peer_across_workers(
    config: dict[str, Any], redis_url: str, prefix: str
) -> None:
    settings = settings_with_redis(config, redis_url, prefix)
    first, second = RateLimiter(settings, time.time), RateLimiter(settings, time.time)
    try:
        results = [
            (first if i % 2 else second).take_failure("10.0.0.7", "gateway")
            for i in range(BURST + 1)
        ]
        other_peer = first.take_failure("10.0.0.8", "gateway")
        real_client = second.take("gateway")
    finally:
        first.close()
        second.close()
    assert results[:BURST] == [None] * BURST
    assert results[BURST] is not None
    assert other_peer is None
    assert real_client is None  # failures never spend the client's budget


def test_idle_buckets_expire(config: dict[str, Any], redis_url: str, prefix: str) -> None:
    limiter = RateLimiter(settings_with_redis(config, redis_url, prefix), time.time)
    client = redis.Redis.from_url(redis_url)
    try:
        limiter.take("gateway")
        [key] = list(client.scan_iter(f"{prefix}*"))
        ttl = client.pttl(key)
    finally:
        limiter.close()
        client.close()
    # Full again after (burst - level) / rate seconds: 1 token at 0.5/s, plus a second of margin.
    assert 0 < ttl <= 3000


UNREACHABLE = "redis://127.0.0.1:1/0"  # nothing listens on port 1


@pytest.mark.parametrize(
    ("on_failure", "expected"),
    [("local", [None] * BURST + ["refused"]), ("open", [None] * (BURST + 1))],
)
def test_an_unreachable_redis_falls_back_as_configured(
    config: dict[str, Any], on_failure: str, expected: list[Any]
) -> None:
    settings = settings_with_redis(
        config, UNREACHABLE, "sidecar-test:", on_failure=on_failure, timeout="200ms"
    )
    limiter = RateLimiter(settings, time.time)
    try:
        outcomes = [limiter.take("gateway") for _ in range(BURST + 1)]
    finally:
        limiter.close()
    assert [None if o is None else "refused" for o in outcomes] == expected


def test_an_unreachable_redis_refuses_when_configured_closed(config: dict[str, Any]) -> None:
    settings = settings_with_redis(
        config, UNREACHABLE, "sidecar-test:", on_failure="closed", timeout="200ms"
    )
    limiter = RateLimiter(settings, time.time)
    try:
        with pytest.raises(TemporarilyUnavailableError):
            limiter.take("gateway")
    finally:
        limiter.close()


def test_a_redis_url_needs_a_redis_scheme(config: dict[str, Any]) -> None:
    from sidecar.config import ConfigError

    with pytest.raises(ConfigError, match=r"redis\.url"):
        settings_from_mapping({**config, "redis": {"url": "http://redis:6379"}}, env={})
