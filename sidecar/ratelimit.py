"""Rate limiting of the token endpoint: token buckets in each worker process, answered with 429 +
``Retry-After``.

Only a request that *authenticated* as a client spends that client's budget: the client id a
request merely claims is no proof, and charging it would let anyone lock a client out by claiming
its id with a wrong secret. Before authentication (to shed overload before any signature work)
the claimed client's bucket is only peeked at: since nothing unauthenticated drains it, a claim
cannot empty it, only find it already emptied by the real client.

Failed authentications are counted apart, per peer address, with the default limit: a peer over
that budget gets 429 instead of 401, while its requests that do authenticate are never refused
because of it (in a sidecar, the attacker and the real gateway may both be 127.0.0.1). The peer
table is bounded, least recently used evicted first. Failures claiming no configured client also
share one bucket, a bound across all peers on guessing at client ids."""

from __future__ import annotations

import base64
import binascii
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

from sidecar.config import RateLimitConfig, Settings
from sidecar.exchange.request import FormParams

# Enough for every peer a sidecar normally sees; an attacker with more addresses than this only
# recycles buckets, and never grows the memory.
MAX_PEERS = 10_000


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated_at: float


class RateLimiter:
    def __init__(
        self, settings: Settings, clock: Callable[[], float], *, max_peers: int = MAX_PEERS
    ) -> None:
        self._clock = clock
        self._default = settings.rate_limit
        self._configured = frozenset(client.client_id for client in settings.clients)
        self._limits: dict[str, RateLimitConfig] = {}
        for client in settings.clients:
            limit = client.rate_limit or settings.rate_limit
            if limit is not None:
                self._limits[client.client_id] = limit
        # Keyed by configured client id: bounded by the configuration.
        self._clients: dict[str, _Bucket] = {}
        # Apart from the clients', so that no client id (not even "(unknown)") can name it.
        self._unknown: _Bucket | None = None
        # Keyed by (peer, per_second, burst): a peer has one bucket per limit it was charged at.
        self._peers: OrderedDict[tuple[str, float, int], _Bucket] = OrderedDict()
        self._max_peers = max(1, max_peers)
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        """Whether any limit is configured (else nothing needs to be read for a bucket)."""
        return self._default is not None or bool(self._limits)

    @property
    def peer_count(self) -> int:
        return len(self._peers)

    def peek(self, claimed_client_id: str | None) -> int | None:
        """Before authentication: the seconds to wait if the claimed client's bucket is already
        empty, else None. Takes nothing, so an unauthenticated claim never costs the client."""
        if claimed_client_id is None or (limit := self._limits.get(claimed_client_id)) is None:
            return None
        now = self._clock()
        with self._lock:
            bucket = self._clients.get(claimed_client_id)
            if bucket is None:
                return None
            _refill(bucket, limit, now)
            return None if bucket.tokens >= 1.0 else _wait(bucket, limit)

    def take(self, client_id: str) -> int | None:
        """One request of a client that has authenticated: None if allowed, else the seconds
        after which a retry may succeed."""
        limit = self._limits.get(client_id)
        if limit is None:
            return None
        now = self._clock()
        with self._lock:
            return _take([(self._client_bucket(client_id, limit, now), limit)], now)

    def take_failure(self, peer: str, claimed_client_id: str | None) -> int | None:
        """One failed authentication from ``peer``: None while the peer (and, for a claim naming
        no configured client, everyone guessing ids) is within budget, else the seconds to wait.
        The limit is the default one; without a default, the claimed client's own, if any."""
        limit = self._default
        if limit is None and claimed_client_id is not None:
            limit = self._limits.get(claimed_client_id)
        if limit is None:
            return None
        now = self._clock()
        with self._lock:
            charged = [
                (self._peer_bucket((peer, limit.per_second, limit.burst), limit, now), limit)
            ]
            if claimed_client_id not in self._configured:
                if self._unknown is None:
                    self._unknown = _Bucket(float(limit.burst), now)
                charged.append((self._unknown, limit))
            return _take(charged, now)

    def _client_bucket(self, key: str, limit: RateLimitConfig, now: float) -> _Bucket:
        bucket = self._clients.get(key)
        if bucket is None:
            bucket = self._clients[key] = _Bucket(float(limit.burst), now)
        return bucket

    def _peer_bucket(
        self, key: tuple[str, float, int], limit: RateLimitConfig, now: float
    ) -> _Bucket:
        bucket = self._peers.get(key)
        if bucket is not None:
            self._peers.move_to_end(key)
            return bucket
        while len(self._peers) >= self._max_peers:
            self._peers.popitem(last=False)
        bucket = self._peers[key] = _Bucket(float(limit.burst), now)
        return bucket


def _refill(bucket: _Bucket, limit: RateLimitConfig, now: float) -> None:
    elapsed = max(0.0, now - bucket.updated_at)
    bucket.tokens = min(float(limit.burst), bucket.tokens + elapsed * limit.per_second)
    bucket.updated_at = now


def _wait(bucket: _Bucket, limit: RateLimitConfig) -> int:
    return max(1, math.ceil((1.0 - bucket.tokens) / limit.per_second))


def _take(charged: list[tuple[_Bucket, RateLimitConfig]], now: float) -> int | None:
    """One token from every bucket, or from none (a refused request costs nothing)."""
    for bucket, limit in charged:
        _refill(bucket, limit, now)
    waits = [_wait(bucket, limit) for bucket, limit in charged if bucket.tokens < 1.0]
    if waits:
        return max(waits)
    for bucket, _ in charged:
        bucket.tokens -= 1.0
    return None


def claimed_client_id(form: FormParams, authorization: str | None) -> str | None:
    """Who the request says it is, read without any verification (trusted for nothing but the
    choice of bucket to peek at): the client_id parameter, the Basic user, or an assertion's sub.
    Never raises: anything unreadable claims no one."""
    claimed = form.single("client_id")
    if claimed is not None:
        return claimed
    if authorization is not None and authorization[:6].lower() == "basic ":
        try:
            decoded = base64.b64decode(authorization[6:], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return unquote(decoded.partition(":")[0]) or None  # RFC 6749 §2.3.1 form-encodes it
    assertion = form.single("client_assertion")
    if assertion is not None and assertion.count(".") == 2:
        payload = assertion.split(".")[1]
        try:
            unverified_claims = json.loads(
                base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
            )
        except (ValueError, RecursionError):  # RecursionError: deeply nested JSON
            return None
        sub = unverified_claims.get("sub") if isinstance(unverified_claims, dict) else None
        return sub if isinstance(sub, str) else None
    return None
