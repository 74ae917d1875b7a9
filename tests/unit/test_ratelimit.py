"""The token buckets of sidecar/ratelimit.py (per client, taken after authentication; peeked at
before it; failed authentications per peer), and who a request claims to be."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from sidecar.config import Settings, settings_from_mapping
from sidecar.exchange.request import FormParams, parse_form
from sidecar.ratelimit import MAX_PEERS, RateLimiter, claimed_client_id
from tests.conftest import FakeClock


def limited(config: dict[str, Any], **overrides: Any) -> Settings:
    return settings_from_mapping({**config, **overrides}, env={})


def test_without_a_rate_limit_nothing_is_limited(settings: Settings) -> None:
    limiter = RateLimiter(settings, FakeClock(1000.0))
    assert not limiter.active
    assert all(limiter.take("gateway") is None for _ in range(1000))
    assert all(limiter.take_failure("10.0.0.1", "gateway") is None for _ in range(1000))
    assert limiter.peek("gateway") is None


def test_a_burst_is_allowed_then_refused_with_a_retry_after(config: dict[str, Any]) -> None:
    clock = FakeClock(1000.0)
    limiter = RateLimiter(limited(config, rate_limit={"per_second": 2, "burst": 3}), clock)

    assert [limiter.take("gateway") for _ in range(3)] == [None, None, None]
    assert limiter.take("gateway") == 1

    clock.advance(0.5)  # one token back at 2 per second
    assert limiter.take("gateway") is None
    assert limiter.take("gateway") == 1


def test_buckets_are_per_client(config: dict[str, Any]) -> None:
    limiter = RateLimiter(limited(config, rate_limit={"per_second": 1, "burst": 1}), FakeClock())

    assert limiter.take("gateway") is None
    assert limiter.take("gateway") is not None
    assert limiter.take("jwt-gateway") is None


def test_a_client_override_applies_to_that_client_only(config: dict[str, Any]) -> None:
    config["clients"][0]["rate_limit"] = {"per_second": 1, "burst": 1}
    limiter = RateLimiter(limited(config), FakeClock())

    assert limiter.active
    assert limiter.take("gateway") is None
    assert limiter.take("gateway") is not None
    assert all(limiter.take("jwt-gateway") is None for _ in range(100))


def test_a_slow_rate_gives_a_longer_retry_after(config: dict[str, Any]) -> None:
    limiter = RateLimiter(limited(config, rate_limit={"per_second": 0.1, "burst": 1}), FakeClock())

    assert limiter.take("gateway") is None
    assert limiter.take("gateway") == 10


# --- peek: before authentication ------------------------------------------------------------------


def test_a_peek_takes_nothing(config: dict[str, Any]) -> None:
    limiter = RateLimiter(limited(config, rate_limit={"per_second": 1, "burst": 2}), FakeClock())

    assert all(limiter.peek("gateway") is None for _ in range(100))
    assert [limiter.take("gateway") for _ in range(3)] == [None, None, 1]


def test_a_peek_refuses_once_the_client_itself_emptied_its_bucket(config: dict[str, Any]) -> None:
    clock = FakeClock()
    limiter = RateLimiter(limited(config, rate_limit={"per_second": 0.5, "burst": 2}), clock)

    assert [limiter.take("gateway") for _ in range(2)] == [None, None]
    assert limiter.peek("gateway") == 2
    assert limiter.peek("jwt-gateway") is None  # another client's bucket is untouched
    clock.advance(2)
    assert limiter.peek("gateway") is None
    assert limiter.take("gateway") is None
    assert limiter.peek("gateway") == 2


@pytest.mark.parametrize("claimed", [None, "stranger", "(unknown)"])
def test_a_peek_for_no_configured_client_never_refuses(
    config: dict[str, Any], claimed: str | None
) -> None:
    # Such a request cannot authenticate: it can only fail, and failures are counted apart.
    limiter = RateLimiter(limited(config, rate_limit={"per_second": 1, "burst": 1}), FakeClock())
    for _ in range(5):
        limiter.take_failure("10.0.0.1", claimed)
    assert limiter.peek(claimed) is None


# --- failed authentication: per peer --------------------------------------------------------------


def test_failures_never_spend_the_claimed_clients_budget(config: dict[str, Any]) -> None:
    limiter = RateLimiter(limited(config, rate_limit={"per_second": 1, "burst": 3}), FakeClock())

    failures = [limiter.take_failure("127.0.0.1", "gateway") for _ in range(120)]

    assert failures[:3] == [None, None, None]
    assert all(wait == 1 for wait in failures[3:])
    assert limiter.peek("gateway") is None
    assert [limiter.take("gateway") for _ in range(4)] == [None, None, None, 1]


def test_failure_buckets_are_per_peer(config: dict[str, Any]) -> None:
    limiter = RateLimiter(limited(config, rate_limit={"per_second": 1, "burst": 2}), FakeClock())

    assert [limiter.take_failure("10.0.0.1", "gateway") for _ in range(3)] == [None, None, 1]
    assert limiter.take_failure("10.0.0.2", "gateway") is None
    assert limiter.take_failure("10.0.0.1", "jwt-gateway") == 1  # the peer, whatever it claims


def test_failures_naming_no_configured_client_also_share_one_bucket(
    config: dict[str, Any],
) -> None:
    limiter = RateLimiter(limited(config, rate_limit={"per_second": 1, "burst": 2}), FakeClock())

    assert limiter.take_failure("10.0.0.1", "stranger-1") is None
    assert limiter.take_failure("10.0.0.2", None) is None
    # A third peer has its own budget left, but guesses at ids from all peers share one.
    assert limiter.take_failure("10.0.0.3", "stranger-2") == 1
    # Claiming a configured client draws on the peer's budget only; the refusal cost nothing.
    assert limiter.take_failure("10.0.0.3", "gateway") is None


def test_without_a_default_failures_use_the_claimed_clients_own_limit(
    config: dict[str, Any],
) -> None:
    config["clients"][0]["rate_limit"] = {"per_second": 1, "burst": 2}
    limiter = RateLimiter(limited(config), FakeClock())

    assert [limiter.take_failure("10.0.0.1", "gateway") for _ in range(3)] == [None, None, 1]
    assert all(limiter.take_failure("10.0.0.1", "jwt-gateway") is None for _ in range(50))
    assert all(limiter.take_failure("10.0.0.1", "stranger") is None for _ in range(50))


def test_a_peer_failure_budget_refills(config: dict[str, Any]) -> None:
    clock = FakeClock()
    limiter = RateLimiter(limited(config, rate_limit={"per_second": 0.25, "burst": 1}), clock)

    assert limiter.take_failure("10.0.0.1", "gateway") is None
    assert limiter.take_failure("10.0.0.1", "gateway") == 4
    clock.advance(4)
    assert limiter.take_failure("10.0.0.1", "gateway") is None


def test_the_peer_table_is_bounded_least_recently_used_first(config: dict[str, Any]) -> None:
    limiter = RateLimiter(
        limited(config, rate_limit={"per_second": 1, "burst": 1}), FakeClock(), max_peers=3
    )
    for peer in ("a", "b", "c"):
        assert limiter.take_failure(peer, "gateway") is None
    assert limiter.take_failure("a", "gateway") == 1  # a is now the most recently used

    assert limiter.take_failure("d", "gateway") is None  # evicts b, the least recently used
    assert limiter.peer_count == 3
    assert limiter.take_failure("a", "gateway") == 1  # kept, still empty
    assert limiter.take_failure("b", "gateway") is None  # forgotten: a fresh bucket (evicts c)
    assert limiter.peer_count == 3


def test_the_default_peer_table_stays_bounded(config: dict[str, Any]) -> None:
    limiter = RateLimiter(limited(config, rate_limit={"per_second": 1, "burst": 1}), FakeClock())
    for n in range(MAX_PEERS + 500):
        limiter.take_failure(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}", "gateway")
    assert limiter.peer_count == MAX_PEERS


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


@pytest.mark.parametrize(
    "assertion",
    [
        "e30." + base64.urlsafe_b64encode(b"[" * 40_000).decode() + ".sig",  # nested too deep
        "e30." + base64.urlsafe_b64encode(b"\xff\xfe{").decode() + ".sig",  # not UTF-8/JSON
        "e30.\u00e9\u00e9\u00e9.sig",  # not ASCII
        "e30.e30.sig",  # no sub
        "e30." + base64.urlsafe_b64encode(b'{"sub":42}').decode() + ".sig",
        "e30." + base64.urlsafe_b64encode(b'"sub"').decode() + ".sig",
        "a.b.c.d",
    ],
)
def test_a_malformed_assertion_claims_no_one(assertion: str) -> None:
    form = FormParams({"client_assertion": [assertion]})
    assert claimed_client_id(form, None) is None
