"""In-process caches of the exchange (``caches:`` in the config): gateways exchange the same user
token for the same upstream many times while it lives.

- :class:`SubjectTokenCache`: verified subject and actor tokens, keyed by the SHA-256 of the
  token, each kept no longer than its ``exp``. A hit is used only while the issuer still publishes
  the key that verified it (and its key set is not stale), so an IdP removing a key stops it.
- :class:`MintedTokenCache`: a minted token, reused for an identical request (same client, same
  subject and actor tokens, same targets, scope and token type) while at least ``min_remaining`` of
  its lifetime is left, when every matched policy allows reuse (``reuse_tokens``). A hit is used
  only when the policy decision made *now* for the request is
  the one the token was minted under (same policies, audiences, scopes and copied claims), the
  token does not outlive what that decision allows, and its key is still the signing key: a
  policy change, a key rotation or retirement, or a client that no longer authenticates stops
  reuse at once.

  "The same policies" means the same stored *versions*, not only equal values: a policy disabled
  then enabled again is equal to what it was, but a token minted before the disable must never
  be handed out after it. The policy store gives every version of a policy an object of its own
  and keeps that object across reloads while the version is unchanged
  (:meth:`sidecar.store.policies.PolicyStore.load`), so the policies of the two decisions are
  compared by identity: a change to a matched policy (even one undone) stops reuse, a change to
  another policy does not. An entry holds its decision, so the objects it compares stay alive.

Neither cache ever holds a failure: every refusal is decided afresh.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from sidecar.exchange.policy import Decision
from sidecar.exchange.subject import IssuerDirectory, VerificationKey, VerifiedToken

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ExpiringCache(Generic[K, V]):
    """A bounded map whose entries expire at their own deadline; when full, the least recently
    used entry goes first. Thread-safe."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[K, tuple[V, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K, now: float) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and now >= entry[1]:
                del self._entries[key]
                entry = None
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: K, value: V, expires_at: float) -> None:
        with self._lock:
            self._entries[key] = (value, expires_at)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def discard(self, key: K) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


class CacheStats:
    """Lookups of one cache in this process; ``observe(hit)`` also feeds the metrics."""

    def __init__(self) -> None:
        self.hits = self.misses = 0
        self.observe: Callable[[bool], None] | None = None
        self._lock = threading.Lock()

    def count(self, hit: bool) -> None:
        with self._lock:
            if hit:
                self.hits += 1
            else:
                self.misses += 1
        if self.observe is not None:
            self.observe(hit)

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


@dataclass(frozen=True, slots=True)
class _Verified:
    token: VerifiedToken
    key: VerificationKey  # what verified it; its kid is the token's


class SubjectTokenCache:
    def __init__(self, issuers: IssuerDirectory, max_entries: int) -> None:
        self._issuers = issuers
        self.entries: ExpiringCache[bytes, _Verified] = ExpiringCache(max_entries)
        self.stats = CacheStats()

    def get(self, digest: bytes, now: float, *, count_miss: bool = True) -> VerifiedToken | None:
        """The verified token, or None; ``count_miss=False`` leaves a miss for the caller to
        count (once the token was verified: see TokenExchangeGrant.verify)."""
        hit = self.entries.get(digest, now)
        if hit is not None:
            trusted = self._issuers.find_issuer(hit.token.issuer)
            # find_key raises 503 when the issuer's keys are stale, as verification would.
            # Compared by value: a scheduled JWKS reload builds new key objects for the same keys.
            if trusted is None or trusted.find_key(hit.key.kid) != hit.key:
                self.entries.discard(digest)  # the key changed or went: verify afresh
                hit = None
        if hit is not None or count_miss:
            self.stats.count(hit is not None)
        return None if hit is None else hit.token

    def put(self, digest: bytes, token: VerifiedToken, key: VerificationKey, now: float) -> None:
        # A token accepted within the leeway after its exp is not kept (it would only evict).
        if token.expires_at > now:
            self.entries.put(digest, _Verified(token, key), float(token.expires_at))


MintedKey = tuple[str, bytes, bytes | None, tuple[str, ...], tuple[str, ...] | None, str]


@dataclass(frozen=True, slots=True)
class MintedToken:
    access_token: str
    kid: str
    jti: str
    scope: str
    issued_at: int
    expires_at: int
    decision: Decision

    def reusable(
        self, decision: Decision, signing_kid: str, now: int, min_remaining: float
    ) -> bool:
        remaining = self.expires_at - now
        return (
            self.kid == signing_kid
            and remaining >= min_remaining * (self.expires_at - self.issued_at)
            and self.expires_at <= now + decision.lifetime
            and _same_grant(self.decision, decision)
        )


def _same_grant(a: Decision, b: Decision) -> bool:
    # The very policy objects (the same stored versions), so also equal in value: any change to a
    # matched policy (scopes, ttl, conditions, enabled, copied claims...), undone or not, makes a
    # different decision, and no reuse.
    return (
        len(a.policies) == len(b.policies)
        and all(x is y for x, y in zip(a.policies, b.policies, strict=True))
        and a.audiences == b.audiences
        and a.scopes == b.scopes
        and a.copy_claims == b.copy_claims
    )


class MintedTokenCache:
    def __init__(self, max_entries: int, min_remaining: float) -> None:
        self.min_remaining = min_remaining
        self.entries: ExpiringCache[MintedKey, MintedToken] = ExpiringCache(max_entries)
        self.stats = CacheStats()

    def get(
        self, key: MintedKey, decision: Decision, signing_kid: str, now: int
    ) -> MintedToken | None:
        if not decision.reuse_tokens:
            return None  # the policy does not allow it: not a lookup
        hit = self.entries.get(key, now)
        if hit is not None and not hit.reusable(decision, signing_kid, now, self.min_remaining):
            self.entries.discard(key)
            hit = None
        self.stats.count(hit is not None)
        return hit

    def put(self, key: MintedKey, minted: MintedToken) -> None:
        if not minted.decision.reuse_tokens:
            return
        # Kept only while it could still be reused (reusable() decides; the deadline lets the
        # last second in which it is reusable through).
        lifetime = minted.expires_at - minted.issued_at
        self.entries.put(key, minted, minted.expires_at - self.min_remaining * lifetime + 1)
