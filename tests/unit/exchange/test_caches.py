"""The in-process caches of the exchange (``sidecar/exchange/caches.py``), each on its own: the
bounded expiring map under both, the cache of verified subject/actor tokens (against an issuer
directory whose keys change) and the cache of minted tokens (against the decision made now)."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.config import settings_from_mapping
from sidecar.errors import TemporarilyUnavailableError
from sidecar.exchange.caches import (
    CacheStats,
    ExpiringCache,
    MintedKey,
    MintedToken,
    MintedTokenCache,
    SubjectTokenCache,
)
from sidecar.exchange.policy import Condition, Decision, Policy
from sidecar.exchange.subject import (
    IssuerKeys,
    VerificationKey,
    VerifiedToken,
    token_digest,
    verify_token_and_key,
)
from sidecar.issuers import IssuerDirectory
from tests.conftest import CODE_SEARCH, TICKETS, FakeClock, TestIdP

LEEWAY = 30

# --- ExpiringCache ------------------------------------------------------------------------------


def holding(max_entries: int, *keys: str) -> ExpiringCache[str, str]:
    """A cache of ``max_entries`` into which each key was put in this order, its value the key
    in capitals, until 100.0."""
    cache: ExpiringCache[str, str] = ExpiringCache(max_entries)
    for key in keys:
        cache.put(key, key.upper(), expires_at=100.0)
    return cache


def test_an_entry_is_returned_until_its_deadline_and_dropped_at_it() -> None:
    cache: ExpiringCache[str, str] = ExpiringCache(10)
    cache.put("a", "value", expires_at=100.0)

    assert cache.get("a", 0.0) == "value"
    assert cache.get("a", 99.999) == "value"
    assert len(cache) == 1
    assert cache.get("a", 100.0) is None  # the deadline itself is past
    assert len(cache) == 0  # an expired entry is removed, not kept
    assert cache.get("a", 50.0) is None  # and stays gone even for an earlier clock


def test_each_entry_expires_at_its_own_deadline() -> None:
    cache: ExpiringCache[str, int] = ExpiringCache(10)
    cache.put("short", 1, expires_at=10.0)
    cache.put("long", 2, expires_at=20.0)

    assert cache.get("short", 15.0) is None
    assert cache.get("long", 15.0) == 2
    assert cache.get("long", 20.0) is None


def test_put_replaces_the_value_and_the_deadline() -> None:
    cache: ExpiringCache[str, str] = ExpiringCache(10)
    cache.put("a", "old", expires_at=10.0)
    cache.put("a", "new", expires_at=30.0)

    assert len(cache) == 1
    assert cache.get("a", 20.0) == "new"


def test_when_full_the_least_recently_used_entry_goes_first() -> None:
    cache = holding(2, "a", "b", "c")

    assert len(cache) == 2
    assert cache.get("a", 0.0) is None
    assert cache.get("b", 0.0) == "B"
    assert cache.get("c", 0.0) == "C"


def test_a_hit_moves_the_entry_to_the_most_recently_used_end() -> None:
    cache = holding(2, "a", "b")

    assert cache.get("a", 0.0) == "A"  # now "b" is the least recently used
    cache.put("c", "C", expires_at=100.0)

    assert cache.get("b", 0.0) is None
    assert cache.get("a", 0.0) == "A"
    assert cache.get("c", 0.0) == "C"


def test_a_miss_does_not_change_the_eviction_order() -> None:
    cache = holding(2, "a", "b")

    assert cache.get("zzz", 0.0) is None
    cache.put("c", "C", expires_at=100.0)

    assert cache.get("a", 0.0) is None  # still the oldest
    assert cache.get("b", 0.0) == "B"


def test_re_putting_an_entry_makes_it_the_most_recently_used() -> None:
    cache = holding(2, "a", "b")
    cache.put("a", "A2", expires_at=100.0)
    cache.put("c", "C", expires_at=100.0)

    assert cache.get("b", 0.0) is None
    assert cache.get("a", 0.0) == "A2"


def test_max_entries_one_keeps_only_the_last_entry() -> None:
    cache: ExpiringCache[str, str] = ExpiringCache(1)
    for key in ("a", "b", "a", "b"):
        cache.put(key, key.upper(), expires_at=100.0)
        assert len(cache) == 1
    assert cache.get("a", 0.0) is None
    assert cache.get("b", 0.0) == "B"


def test_discard_and_clear() -> None:
    cache = holding(10, "a", "b")

    cache.discard("a")
    cache.discard("missing")  # no error
    assert cache.get("a", 0.0) is None
    assert cache.get("b", 0.0) == "B"
    cache.clear()
    assert len(cache) == 0
    assert cache.get("b", 0.0) is None


def test_the_bound_holds_under_concurrent_use() -> None:
    cache: ExpiringCache[tuple[int, int], int] = ExpiringCache(50)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for i in range(2000):
                cache.put((worker, i), i, expires_at=1000.0)
                value = cache.get((worker, i - 1), 0.0)
                assert value in (None, i - 1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(cache) == 50


# --- CacheStats ---------------------------------------------------------------------------------


def test_stats_count_hits_and_misses_and_feed_the_observer() -> None:
    stats = CacheStats()
    assert stats.hit_rate == 0.0  # no lookup yet: no division by zero
    seen: list[bool] = []
    stats.observe = seen.append

    for hit in (True, False, True, True):
        stats.count(hit)

    assert (stats.hits, stats.misses) == (3, 1)
    assert stats.hit_rate == 0.75
    assert seen == [True, False, True, True]


# --- SubjectTokenCache --------------------------------------------------------------------------


class StaticIssuer:
    """One trusted issuer whose key objects the test replaces at will."""

    def __init__(self, idp: TestIdP, keys: dict[str, VerificationKey]) -> None:
        self.issuer = idp.issuer
        self.audiences = (idp.audience,)
        self.algorithms = frozenset({"RS256", "ES256"})
        self.keys = keys

    def find_key(self, kid: str) -> VerificationKey | None:
        return self.keys.get(kid)


class StaticIssuers:
    """An issuer directory with one issuer, or none once ``trusted`` is cleared."""

    def __init__(self, issuer: StaticIssuer) -> None:
        self.issuer = issuer
        self.trusted = True

    def find_issuer(self, issuer: str) -> IssuerKeys | None:
        if self.trusted and issuer == self.issuer.issuer:
            return self.issuer
        return None


def rsa_verification_key(kid: str, private_key: rsa.RSAPrivateKey) -> VerificationKey:
    return VerificationKey(kid=kid, key=private_key.public_key(), algorithms=frozenset({"RS256"}))


@pytest.fixture(scope="module")
def module_idp(tmp_path_factory: pytest.TempPathFactory) -> TestIdP:
    return TestIdP(tmp_path_factory.mktemp("caches-idp"))


@pytest.fixture
def static_issuers(module_idp: TestIdP) -> StaticIssuers:
    keys = {"rsa-1": rsa_verification_key("rsa-1", module_idp.rsa_key)}
    return StaticIssuers(StaticIssuer(module_idp, keys))


def verified(token: str, issuers: Any) -> tuple[bytes, VerifiedToken, VerificationKey]:
    """Really verified: the cache is filled the way the grant fills it."""
    digest = token_digest(token)
    result, key = verify_token_and_key(token, issuers, leeway=LEEWAY, digest=digest)
    return digest, result, key


def cached(
    token: str, issuers: Any, now: float, max_entries: int = 10
) -> tuple[SubjectTokenCache, bytes, VerifiedToken, VerificationKey]:
    """A subject token cache into which ``token``, really verified, was put at ``now``."""
    digest, result, key = verified(token, issuers)
    cache = SubjectTokenCache(issuers, max_entries=max_entries)
    cache.put(digest, result, key, now)
    return cache, digest, result, key


def test_a_verified_token_is_a_hit_until_its_exp(
    module_idp: TestIdP, static_issuers: StaticIssuers
) -> None:
    now = int(time.time())
    token = module_idp.token(exp=now + 600)
    digest, result, key = verified(token, static_issuers)
    cache = SubjectTokenCache(static_issuers, max_entries=10)

    assert cache.get(digest, now) is None  # not verified through the cache yet
    cache.put(digest, result, key, now)

    assert cache.get(digest, now) is result
    assert cache.get(digest, now + 599.9) is result
    assert cache.get(digest, now + 600) is None  # at exp
    assert cache.get(digest, now + 10) is None  # gone, not hidden
    assert (cache.stats.hits, cache.stats.misses) == (2, 3)


def test_another_token_is_a_miss(module_idp: TestIdP, static_issuers: StaticIssuers) -> None:
    cache, digest, result, _ = cached(module_idp.token(), static_issuers, time.time())
    other, _, _ = verified(module_idp.token(), static_issuers)  # same claims but the jti

    assert other != digest
    assert cache.get(other, time.time()) is None
    assert cache.get(digest, time.time()) is result


def test_a_key_object_replaced_under_the_same_kid_is_a_miss(
    module_idp: TestIdP, static_issuers: StaticIssuers
) -> None:
    cache, digest, result, key = cached(module_idp.token(), static_issuers, time.time())
    assert cache.get(digest, time.time()) is result

    # The same kid, now another key: what verified the token is no longer published.
    replacement = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    static_issuers.issuer.keys["rsa-1"] = rsa_verification_key("rsa-1", replacement)

    assert cache.get(digest, time.time()) is None
    assert len(cache.entries) == 0  # dropped: verify afresh
    # Even if the original key comes back, the entry is not resurrected.
    static_issuers.issuer.keys["rsa-1"] = key
    assert cache.get(digest, time.time()) is None


def test_an_equal_but_reparsed_key_object_keeps_hitting(
    module_idp: TestIdP, static_issuers: StaticIssuers
) -> None:
    # Keys compare by value: a scheduled JWKS reload re-parses the same key into a new object,
    # which must not turn every cached token into a miss.
    cache, digest, result, _ = cached(module_idp.token(), static_issuers, time.time())

    static_issuers.issuer.keys["rsa-1"] = rsa_verification_key("rsa-1", module_idp.rsa_key)

    assert cache.get(digest, time.time()) is result


def test_a_token_past_its_exp_is_not_stored(
    module_idp: TestIdP, static_issuers: StaticIssuers
) -> None:
    # Accepted within the leeway after exp, it would only evict live entries.
    now = int(time.time())
    cache, _, _, _ = cached(module_idp.token(exp=now + 600), static_issuers, now + 600)
    assert len(cache.entries) == 0


def test_a_key_gone_from_the_issuer_is_a_miss(
    module_idp: TestIdP, static_issuers: StaticIssuers
) -> None:
    cache, digest, _, _ = cached(module_idp.token(), static_issuers, time.time())

    del static_issuers.issuer.keys["rsa-1"]

    assert cache.get(digest, time.time()) is None
    assert cache.stats.misses == 1


def test_an_issuer_no_longer_trusted_is_a_miss(
    module_idp: TestIdP, static_issuers: StaticIssuers
) -> None:
    cache, digest, _, _ = cached(module_idp.token(), static_issuers, time.time())

    static_issuers.trusted = False

    assert cache.get(digest, time.time()) is None


def test_the_subject_cache_is_bounded(module_idp: TestIdP, static_issuers: StaticIssuers) -> None:
    cache = SubjectTokenCache(static_issuers, max_entries=2)
    entries = [verified(module_idp.token(), static_issuers) for _ in range(3)]
    for digest, result, key in entries:
        cache.put(digest, result, key, time.time())

    assert len(cache.entries) == 2
    assert cache.get(entries[0][0], time.time()) is None
    assert cache.get(entries[1][0], time.time()) is entries[1][1]
    assert cache.get(entries[2][0], time.time()) is entries[2][1]


# ... against the real issuer directory, reading the IdP's JWKS file on a controlled clock.


@pytest.fixture
def directory_clock() -> FakeClock:
    return FakeClock(float(int(time.time())))


@pytest.fixture
def config(config: dict[str, Any]) -> dict[str, Any]:
    config["trusted_issuers"][0].update(
        refresh_interval="1s", min_refetch_interval="1s", max_stale="10s"
    )
    return config


@pytest.fixture
def directory(config: dict[str, Any], directory_clock: FakeClock) -> IssuerDirectory:
    return IssuerDirectory(settings_from_mapping(config, env={}), directory_clock)


def published_key(directory: IssuerDirectory, idp: TestIdP, kid: str) -> VerificationKey | None:
    trusted = directory.find_issuer(idp.issuer)
    assert trusted is not None
    return trusted.find_key(kid)


def wait_for_reload(
    directory: IssuerDirectory, idp: TestIdP, kid: str, old: VerificationKey
) -> VerificationKey | None:
    """The key published for ``kid`` once the (background) refresh replaced ``old``."""
    deadline = time.monotonic() + 5
    while True:
        key = published_key(directory, idp, kid)
        if key is not old:
            return key
        if time.monotonic() > deadline:
            pytest.fail("the issuer's JWKS was not reloaded")
        time.sleep(0.01)


def test_an_idp_rotating_the_key_behind_a_kid_stops_hits(
    idp: TestIdP, directory: IssuerDirectory, directory_clock: FakeClock
) -> None:
    cache, digest, result, key = cached(idp.token(), directory, directory_clock.now)
    assert cache.get(digest, directory_clock.now) is result

    idp.keys["rsa-1"] = (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")
    idp.write_jwks()
    directory_clock.advance(2)  # past refresh_interval and min_refetch_interval
    new_key = wait_for_reload(directory, idp, "rsa-1", key)

    assert new_key is not None
    assert cache.get(digest, directory_clock.now) is None


def test_an_idp_removing_the_kid_stops_hits(
    idp: TestIdP, directory: IssuerDirectory, directory_clock: FakeClock
) -> None:
    cache, digest, result, key = cached(idp.token(), directory, directory_clock.now)
    assert cache.get(digest, directory_clock.now) is result

    del idp.keys["rsa-1"]
    idp.write_jwks()
    directory_clock.advance(2)

    assert wait_for_reload(directory, idp, "rsa-1", key) is None
    assert cache.get(digest, directory_clock.now) is None


def test_an_unchanged_jwks_keeps_hits_until_it_is_reloaded(
    idp: TestIdP, directory: IssuerDirectory, directory_clock: FakeClock
) -> None:
    cache, digest, result, _ = cached(idp.token(), directory, directory_clock.now)

    directory_clock.advance(0.5)  # within refresh_interval: the same key objects
    assert cache.get(digest, directory_clock.now) is result
    assert cache.stats.hits == 1


def test_stale_issuer_keys_refuse_a_cached_token_as_verification_would(
    idp: TestIdP, directory: IssuerDirectory, directory_clock: FakeClock
) -> None:
    cache, digest, _, _ = cached(idp.token(), directory, directory_clock.now)

    idp.jwks_path.unlink()  # the IdP's keys can no longer be read
    directory_clock.advance(11)  # past max_stale

    with pytest.raises(TemporarilyUnavailableError):
        cache.get(digest, directory_clock.now)
    with pytest.raises(TemporarilyUnavailableError):
        verify_token_and_key(idp.token(), directory, leeway=LEEWAY)


# --- MintedTokenCache ---------------------------------------------------------------------------

ISSUED_AT = 1_000_000
LIFETIME = 120
KID = "kid-1"
KEY: MintedKey = ("gateway", b"subject-digest", None, (CODE_SEARCH,), ("code.read",), "at")


def code_search_policy(**changes: Any) -> Policy:
    """A new object each call: as the store loads a new version of the policy."""
    policy = Policy(
        client_id="gateway",
        audience=CODE_SEARCH,
        scopes=frozenset({"code.read", "code.search"}),
        default_scopes=frozenset({"code.read"}),
        ttl=LIFETIME,
        copy_claims=("email",),
    )
    return dataclasses.replace(policy, **changes)


# The loaded version of the policy: the store keeps this object while the version is unchanged.
CODE_SEARCH_POLICY = code_search_policy()


def decision(**changes: Any) -> Decision:
    made = Decision(
        audiences=(CODE_SEARCH,),
        scopes=("code.read",),
        lifetime=LIFETIME,
        copy_claims=("email",),
        policies=(CODE_SEARCH_POLICY,),
    )
    return dataclasses.replace(made, **changes)


def minted(**changes: Any) -> MintedToken:
    token = MintedToken(
        access_token="eyJ.minted.token",
        kid=KID,
        jti="jti-1",
        scope="code.read",
        issued_at=ISSUED_AT,
        expires_at=ISSUED_AT + LIFETIME,
        decision=decision(),
    )
    return dataclasses.replace(token, **changes)


def filled(
    min_remaining: float = 0.5, max_entries: int = 10
) -> tuple[MintedTokenCache, MintedToken]:
    cache = MintedTokenCache(max_entries, min_remaining)
    token = minted()
    cache.put(KEY, token)
    return cache, token


def test_an_identical_request_reuses_the_minted_token() -> None:
    cache, token = filled()

    assert cache.get(KEY, decision(), KID, ISSUED_AT) is token
    assert cache.get(KEY, decision(), KID, ISSUED_AT + 30) is token
    # An equal decision made afresh (a new Decision, the same loaded policy) is the same grant.
    assert cache.get(KEY, dataclasses.replace(decision()), KID, ISSUED_AT + 31) is token


def test_an_equal_policy_of_another_version_is_a_miss() -> None:
    # Disabled then enabled again: equal to what it was, but another stored version (another
    # object, see PolicyStore.load). The token minted before the disable is never reused.
    cache, _ = filled()
    re_enabled = code_search_policy()
    assert re_enabled == CODE_SEARCH_POLICY

    assert cache.get(KEY, decision(policies=(re_enabled,)), KID, ISSUED_AT + 1) is None
    assert cache.get(KEY, decision(), KID, ISSUED_AT + 2) is None  # dropped
    assert cache.stats.hits == 0


@pytest.mark.parametrize(
    "other",
    [
        ("other-client", *KEY[1:]),
        (KEY[0], b"another-subject", *KEY[2:]),
        (*KEY[:2], b"an-actor", *KEY[3:]),
        (*KEY[:3], (TICKETS,), *KEY[4:]),
        (*KEY[:3], (CODE_SEARCH, TICKETS), *KEY[4:]),
        (*KEY[:4], ("code.read", "code.search"), KEY[5]),
        (*KEY[:4], None, KEY[5]),
        (*KEY[:5], "jwt"),
    ],
    ids=["client", "subject", "actor", "target", "targets", "scope", "no-scope", "token-type"],
)
def test_any_other_request_is_a_miss(other: MintedKey) -> None:
    cache, token = filled()

    assert cache.get(other, decision(), KID, ISSUED_AT) is None
    assert cache.get(KEY, decision(), KID, ISSUED_AT) is token


def test_reused_only_while_min_remaining_of_the_lifetime_is_left() -> None:
    cache, token = filled(min_remaining=0.5)

    assert cache.get(KEY, decision(), KID, ISSUED_AT + 59) is token  # 61 s of 120 left
    assert cache.get(KEY, decision(), KID, ISSUED_AT + 61) is None  # 59 s left
    assert len(cache.entries) == 0


@pytest.mark.parametrize(("min_remaining", "last_reuse"), [(0.25, 90), (0.9, 12), (0.5, 60)])
def test_reusable_follows_min_remaining(min_remaining: float, last_reuse: int) -> None:
    token = minted()

    assert token.reusable(decision(), KID, ISSUED_AT + last_reuse, min_remaining)
    assert not token.reusable(decision(), KID, ISSUED_AT + last_reuse + 1, min_remaining)


@pytest.mark.parametrize(
    ("min_remaining", "last_reuse"), [(0.25, 90), (0.9, 12), (0.5, 60), (1.0, 0)]
)
def test_the_cache_reuses_through_the_last_reusable_second(
    min_remaining: float, last_reuse: int
) -> None:
    # The cache's own deadline must not cut off the second reusable() still allows.
    cache, token = filled(min_remaining=min_remaining)
    assert cache.get(KEY, decision(), KID, ISSUED_AT + last_reuse) is token
    assert cache.get(KEY, decision(), KID, ISSUED_AT + last_reuse + 1) is None


def test_a_higher_min_remaining_stops_reuse_sooner() -> None:
    cache, token = filled(min_remaining=0.9)

    assert cache.get(KEY, decision(), KID, ISSUED_AT + 11) is token  # 109 s left >= 108
    assert cache.get(KEY, decision(), KID, ISSUED_AT + 13) is None  # 107 s left


def test_the_entry_is_not_kept_longer_than_it_could_be_reused() -> None:
    cache, token = filled(min_remaining=0.5)

    # The underlying map itself lets the entry go once it can no longer be reused.
    assert cache.entries.get(KEY, ISSUED_AT + 59) is token
    assert cache.entries.get(KEY, ISSUED_AT + 61) is None
    assert len(cache.entries) == 0


def code_search_changed(**changes: Any) -> Decision:
    return decision(policies=(code_search_policy(**changes),))


@pytest.mark.parametrize(
    "now_decided",
    [
        code_search_changed(ttl=90),
        code_search_changed(scopes=frozenset({"code.read"})),
        code_search_changed(default_scopes=frozenset({"code.read", "code.search"})),
        code_search_changed(copy_claims=()),
        code_search_changed(require_subject_scopes=True),
        code_search_changed(issuer="https://idp.test.example"),
        code_search_changed(conditions=(Condition("sub", "equals", ("alice",)),)),
        code_search_changed(name="renamed"),
        decision(scopes=("code.read", "code.search")),
        decision(audiences=("https://code-search.internal/other",)),
        decision(copy_claims=()),
        decision(policies=(CODE_SEARCH_POLICY, code_search_policy(audience=TICKETS))),
    ],
    ids=[
        "policy-ttl",
        "policy-scopes",
        "policy-default-scopes",
        "policy-copy-claims",
        "policy-require-subject-scopes",
        "policy-issuer",
        "policy-conditions",
        "policy-name",
        "decision-scopes",
        "decision-audiences",
        "decision-copy-claims",
        "decision-policies",
    ],
)
def test_a_different_decision_now_is_a_miss(now_decided: Decision) -> None:
    cache, _ = filled()

    assert cache.get(KEY, now_decided, KID, ISSUED_AT + 1) is None
    # Dropped: going back to the original decision does not bring the old token back.
    assert cache.get(KEY, decision(), KID, ISSUED_AT + 2) is None
    assert cache.stats.hits == 0


def test_conditions_compare_by_type_not_only_by_value() -> None:
    # `equals: true` and `equals: 1` hold for different tokens: a change between them matters.
    cache = MintedTokenCache(10, 0.5)
    with_true = decision(
        policies=(code_search_policy(conditions=(Condition("admin", "equals", (True,)),)),)
    )
    with_one = decision(
        policies=(code_search_policy(conditions=(Condition("admin", "equals", (1,)),)),)
    )
    cache.put(KEY, minted(decision=with_true))

    assert cache.get(KEY, with_one, KID, ISSUED_AT) is None


def test_a_different_signing_kid_is_a_miss() -> None:
    cache, _ = filled()

    assert cache.get(KEY, decision(), "kid-2", ISSUED_AT + 1) is None
    assert cache.get(KEY, decision(), KID, ISSUED_AT + 2) is None  # dropped


def test_never_reused_beyond_what_the_decision_allows_now() -> None:
    cache, token = filled()

    # The same policies, but now the grant may last only 30 s (e.g. capped by the subject
    # token's exp): the token, valid 110 s more, would outlive it.
    assert cache.get(KEY, decision(lifetime=30), KID, ISSUED_AT + 10) is None
    cache.put(KEY, token)
    assert cache.get(KEY, decision(lifetime=110), KID, ISSUED_AT + 10) is token  # exactly fits
    assert cache.get(KEY, decision(lifetime=109), KID, ISSUED_AT + 11) is token
    assert cache.get(KEY, decision(lifetime=108), KID, ISSUED_AT + 11) is None


def test_a_clock_gone_backwards_does_not_extend_the_token() -> None:
    cache, _ = filled()

    # Seen from 10 s before it was minted, the token outlives a fresh one.
    assert cache.get(KEY, decision(), KID, ISSUED_AT - 10) is None


def test_the_minted_cache_is_bounded_least_recently_used_first() -> None:
    cache = MintedTokenCache(max_entries=2, min_remaining=0.5)
    keys = [(f"client-{n}", *KEY[1:]) for n in range(3)]
    tokens = [minted(jti=f"jti-{n}") for n in range(3)]
    cache.put(keys[0], tokens[0])
    cache.put(keys[1], tokens[1])
    assert cache.get(keys[0], decision(), KID, ISSUED_AT) is tokens[0]
    cache.put(keys[2], tokens[2])

    assert len(cache.entries) == 2
    assert cache.get(keys[1], decision(), KID, ISSUED_AT) is None
    assert cache.get(keys[0], decision(), KID, ISSUED_AT) is tokens[0]
    assert cache.get(keys[2], decision(), KID, ISSUED_AT) is tokens[2]


def test_minted_cache_stats() -> None:
    cache, _ = filled()
    seen: list[bool] = []
    cache.stats.observe = seen.append

    cache.get(KEY, decision(), KID, ISSUED_AT)  # hit
    cache.get(KEY, decision(), KID, ISSUED_AT + 1)  # hit
    cache.get(("other", *KEY[1:]), decision(), KID, ISSUED_AT)  # miss: unknown
    cache.get(KEY, decision(), "kid-2", ISSUED_AT + 2)  # miss: found but not reusable

    assert (cache.stats.hits, cache.stats.misses) == (2, 2)
    assert cache.stats.hit_rate == 0.5
    assert seen == [True, True, False, False]


def test_the_stats_of_the_two_caches_are_separate(static_issuers: StaticIssuers) -> None:
    minted_cache = MintedTokenCache(10, 0.5)
    subject_cache = SubjectTokenCache(static_issuers, 10)

    minted_cache.get(KEY, decision(), KID, ISSUED_AT)

    assert (minted_cache.stats.misses, subject_cache.stats.misses) == (1, 0)


# --- with the policy store: a version is an object ---------------------------------------------


def stored_version(services: Any, name: str) -> tuple[Policy, int]:
    stored = services.policy_store.get(name)
    assert stored is not None
    return stored.policy, stored.version


def put_policy(services: Any, policy: Policy) -> None:
    _, version = stored_version(services, policy.name)
    services.policy_store.put(policy, actor="test", if_version=version, create=False)


def gateway_code_search(services: Any) -> Policy:
    found: Policy | None = services.policies.get().find("gateway", CODE_SEARCH)
    assert found is not None
    return found


def test_the_store_keeps_a_policys_object_while_its_version_is_unchanged(services: Any) -> None:
    store = services.policy_store
    first = {p.name: p for p in store.load()}
    code_search = next(p for p in first.values() if p.audience == CODE_SEARCH)
    tickets = next(p for p in first.values() if p.audience == TICKETS)

    put_policy(services, dataclasses.replace(tickets, ttl=30))
    second = {p.name: p for p in store.load()}
    assert second[code_search.name] is code_search  # unchanged: the same object
    assert second[tickets.name] is not tickets

    put_policy(services, dataclasses.replace(code_search, enabled=False))
    put_policy(services, code_search)  # enabled again: equal, but another version
    third = {p.name: p for p in store.load()}
    assert third[code_search.name] == code_search
    assert third[code_search.name] is not code_search


def test_a_token_minted_before_a_disable_is_never_handed_out_after_it_is_undone(
    server: Any, services: Any, idp: TestIdP
) -> None:
    subject = idp.token()
    minted = server.exchange(subject).json()["access_token"]
    assert server.exchange(subject).json()["access_token"] == minted  # reused

    policy = gateway_code_search(services)
    put_policy(services, dataclasses.replace(policy, enabled=False))
    services.policies.invalidate()
    refused = server.exchange(subject)
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_target")

    put_policy(services, policy)
    services.policies.invalidate()
    again = server.exchange(subject)
    assert again.status_code == 200
    assert again.json()["access_token"] != minted
    assert server.exchange(subject).json()["access_token"] == again.json()["access_token"]


def test_a_disable_undone_between_two_loads_still_stops_reuse(
    server: Any, services: Any, idp: TestIdP
) -> None:
    # This worker never saw the disabled state: the version moved on all the same.
    subject = idp.token()
    minted = server.exchange(subject).json()["access_token"]
    policy = gateway_code_search(services)
    put_policy(services, dataclasses.replace(policy, enabled=False))
    put_policy(services, policy)
    services.policies.invalidate()

    again = server.exchange(subject)
    assert again.status_code == 200
    assert again.json()["access_token"] != minted


def test_jti_values_are_unique_128_bit_and_not_shared_with_a_forked_child() -> None:
    import base64
    import os

    from sidecar.exchange.grant import JtiSource

    source = JtiSource()
    values = [source() for _ in range(1000)]  # several 4 KiB reads
    assert len(set(values)) == 1000
    assert all(len(base64.urlsafe_b64decode(v + "==")) == 16 for v in values)

    source()  # the buffer holds unread bytes now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next value must not be the parent's next value
        os.write(write, source().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child_value = os.read(read, 64).decode()
    assert child_value != source()
