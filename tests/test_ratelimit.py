"""The per-client token buckets of sidecar/ratelimit.py, and who a request claims to be."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from sidecar.config import Settings, settings_from_mapping
from sidecar.exchange.request import parse_form
from sidecar.ratelimit import RateLimiter, claimed_client_id
from tests.conftest import FakeClock


def limited(config: dict[str, Any], **overrides: Any) -> Settings:
    return settings_from_mapping({**config, **overrides}, env={})


def test_without_a_rate_limit_nothing_is_limited(settings: Settings) -> None:
    limiter = RateLimiter(settings, FakeClock(1000.0))
    assert all(limiter.retry_after("gateway") is None for _ in range(1000))


def test_a_burst_is_allowed_then_refused_with_a_retry_after(config: dict[str, Any]) -> None:
    clock = FakeClock(1000.0)
    limiter = RateLimiter(limited(config, rate_limit={"per_second": 2, "burst": 3}), clock)

    assert [limiter.retry_after("gateway") for _ in range(3)] == [None, None, None]
    assert limiter.retry_after("gateway") == 1

    clock.advance(0.5)  # one token back at 2 per second
    assert limiter.retry_after("gateway") is None
    assert limiter.retry_after("gateway") == 1


def test_buckets_are_per_client(config: dict[str, Any]) -> None:
    limiter = RateLimiter(limited(config, rate_limit={"per_second": 1, "burst": 1}), FakeClock())

    assert limiter.retry_after("gateway") is None
    assert limiter.retry_after("gateway") is not None
    assert limiter.retry_after("jwt-gateway") is None


def test_unknown_client_ids_share_one_bucket(config: dict[str, Any]) -> None:
    limiter = RateLimiter(limited(config, rate_limit={"per_second": 1, "burst": 2}), FakeClock())

    assert limiter.retry_after("stranger-1") is None
    assert limiter.retry_after("stranger-2") is None
    assert limiter.retry_after("stranger-3") is not None
    assert limiter.retry_after(None) is not None
    assert limiter.retry_after("gateway") is None  # a real client keeps its own bucket


def test_a_client_override_applies_to_that_client_only(config: dict[str, Any]) -> None:
    config["clients"][0]["rate_limit"] = {"per_second": 1, "burst": 1}
    limiter = RateLimiter(limited(config), FakeClock())

    assert limiter.retry_after("gateway") is None
    assert limiter.retry_after("gateway") is not None
    assert all(limiter.retry_after("jwt-gateway") is None for _ in range(100))


def test_a_slow_rate_gives_a_longer_retry_after(config: dict[str, Any]) -> None:
    limiter = RateLimiter(limited(config, rate_limit={"per_second": 0.1, "burst": 1}), FakeClock())

    assert limiter.retry_after("gateway") is None
    assert limiter.retry_after("gateway") == 10


@pytest.mark.parametrize(
    ("body", "authorization", "claimed"),
    [
        (b"client_id=gateway", None, "gateway"),
        (b"grant_type=x", "Basic " + base64.b64encode(b"gateway:secret").decode(), "gateway"),
        (b"grant_type=x", "Basic " + base64.b64encode(b"my%20client:s").decode(), "my client"),
        (b"grant_type=x", "Basic !!!not-base64", None),
        (b"grant_type=x", "Bearer abc", None),
        (b"grant_type=x", None, None),
    ],
)
def test_the_claimed_client_is_read_without_verification(
    body: bytes, authorization: str | None, claimed: str | None
) -> None:
    assert claimed_client_id(parse_form(body), authorization) == claimed


def test_an_assertion_claims_its_unverified_sub() -> None:
    payload = base64.urlsafe_b64encode(b'{"sub":"jwt-gateway"}').rstrip(b"=").decode()
    form = parse_form(f"client_assertion=e30.{payload}.sig".encode())
    assert claimed_client_id(form, None) == "jwt-gateway"
    assert claimed_client_id(parse_form(b"client_assertion=not.a!.jwt"), None) is None
