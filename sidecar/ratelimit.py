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
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

from sidecar.config import RateLimitConfig, RedisConfig, Settings
from sidecar.errors import TemporarilyUnavailableError
from sidecar.exchange.request import FormParams

# Enough for every peer a sidecar normally sees; an attacker with more addresses than this only
# recycles buckets, and never grows the memory.
MAX_PEERS = 10_000
log = logging.getLogger(__name__)
# A bucket: ("client", id), ("peer", address, per_second, burst) or ("unknown", per_second, burst).
Key = tuple[str | float | int, ...]
Charge = tuple[Key, RateLimitConfig]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated_at: float


class LocalBuckets:
    """Token buckets in this process: each worker limits on its own."""

    def __init__(self, max_peers: int = MAX_PEERS) -> None:
        self._buckets: dict[Key, _Bucket] = {}  # clients and the unknown-id bucket: bounded
        self._peers: OrderedDict[Key, _Bucket] = OrderedDict()  # least recently used first
        self._max_peers = max(1, max_peers)
        self._lock = threading.Lock()

    @property
    def peer_count(self) -> int:
        return len(self._peers)

    def peek(self, key: Key, limit: RateLimitConfig, now: float) -> int | None:
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                return None
            _refill(bucket, limit, now)
            return None if bucket.tokens >= 1.0 else _wait(bucket, limit)

    def take(self, charges: list[Charge], now: float) -> int | None:
        """One token from every bucket, or from none (a refused request costs nothing): None,
        or the seconds after which a retry may succeed."""
        with self._lock:
            buckets = [(self._bucket(key, limit, now), limit) for key, limit in charges]
            for bucket, limit in buckets:
                _refill(bucket, limit, now)
            waits = [_wait(bucket, limit) for bucket, limit in buckets if bucket.tokens < 1.0]
            if waits:
                return max(waits)
            for bucket, _ in buckets:
                bucket.tokens -= 1.0
            return None

    def _bucket(self, key: Key, limit: RateLimitConfig, now: float) -> _Bucket:
        if key[0] != "peer":
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(float(limit.burst), now)
            return bucket
        bucket = self._peers.get(key)
        if bucket is not None:
            self._peers.move_to_end(key)
            return bucket
        while len(self._peers) >= self._max_peers:
            self._peers.popitem(last=False)
        bucket = self._peers[key] = _Bucket(float(limit.burst), now)
        return bucket


# One charge of several buckets, atomically, in one round trip: refill each from the time that
# passed (Redis's own clock, so that replicas need no synchronised clocks), then take one token
# from each only if every one has a token. Each bucket expires once it would be full again, so
# idle buckets (an attacker's many addresses) do not accumulate. Returns the seconds to wait, 0
# when the charge was taken.
_TAKE_SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local wait = 0
local tokens = {}
for i = 1, #KEYS do
  local rate = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local state = redis.call('HMGET', KEYS[i], 't', 'u')
  local level = tonumber(state[1]) or burst
  local updated = tonumber(state[2]) or now
  level = math.min(burst, level + math.max(0, now - updated) * rate)
  tokens[i] = level
  if level < 1 then
    wait = math.max(wait, math.max(1, math.ceil((1 - level) / rate)))
  end
end
for i = 1, #KEYS do
  local rate = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local level = tokens[i]
  if wait == 0 then level = level - 1 end
  redis.call('HSET', KEYS[i], 't', tostring(level), 'u', tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil((burst - level) / rate * 1000) + 1000)
end
return wait
"""


class RedisBuckets:
    """Token buckets in Redis, shared by every worker of every replica. When Redis does not
    answer within its timeout, ``on_failure`` decides: each worker's own buckets (``local``),
    no limit (``open``) or a 503 (``closed``)."""

    def __init__(self, config: RedisConfig, fallback: LocalBuckets) -> None:
        import redis

        self._prefix = config.key_prefix
        self._on_failure = config.on_failure
        self._fallback = fallback
        self._client = redis.Redis.from_url(
            config.url,
            socket_timeout=config.timeout,
            socket_connect_timeout=config.timeout,
            health_check_interval=30,
        )
        self._take = self._client.register_script(_TAKE_SCRIPT)
        self._errors: tuple[type[Exception], ...] = (redis.RedisError, OSError)
        # A client whose shared bucket refused it: peeked at without a round trip until then.
        self._refused_until: dict[Key, float] = {}
        self._failures = 0

    @property
    def peer_count(self) -> int:
        return self._fallback.peer_count

    def peek(self, key: Key, limit: RateLimitConfig, now: float) -> int | None:
        until = self._refused_until.get(key)
        if until is None or until <= now:
            return None
        return max(1, math.ceil(until - now))

    def take(self, charges: list[Charge], now: float) -> int | None:
        keys = [self._prefix + ":".join(str(part) for part in key) for key, _ in charges]
        args: list[float | int] = []
        for _, limit in charges:
            args += [limit.per_second, limit.burst]
        try:
            wait = int(self._take(keys=keys, args=args))
        except self._errors as exc:
            return self._unavailable(charges, now, exc)
        if wait:
            for key, _ in charges:
                if key[0] == "client":
                    self._refused_until[key] = now + wait
        return wait or None

    def _unavailable(self, charges: list[Charge], now: float, exc: Exception) -> int | None:
        self._failures += 1
        if self._failures == 1 or self._failures % 1000 == 0:
            log.warning(
                "rate limit store unavailable (%s, %d times); on_failure=%s",
                type(exc).__name__,
                self._failures,
                self._on_failure,
            )
        if self._on_failure == "open":
            return None
        if self._on_failure == "closed":
            raise TemporarilyUnavailableError(reason="rate limit store unavailable")
        return self._fallback.take(charges, now)

    def close(self) -> None:
        self._client.close()


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
        local = LocalBuckets(max_peers)
        self._buckets: LocalBuckets | RedisBuckets = (
            RedisBuckets(settings.redis, local)
            if settings.redis is not None and self.active
            else local
        )

    @property
    def active(self) -> bool:
        """Whether any limit is configured (else nothing needs to be read for a bucket)."""
        return self._default is not None or bool(self._limits)

    @property
    def shared(self) -> bool:
        """Whether the buckets are shared through Redis."""
        return isinstance(self._buckets, RedisBuckets)

    @property
    def peer_count(self) -> int:
        return self._buckets.peer_count

    def peek(self, claimed_client_id: str | None) -> int | None:
        """Before authentication: the seconds to wait if the claimed client's bucket is already
        empty, else None. Takes nothing, so an unauthenticated claim never costs the client."""
        if claimed_client_id is None or (limit := self._limits.get(claimed_client_id)) is None:
            return None
        return self._buckets.peek(("client", claimed_client_id), limit, self._clock())

    def take(self, client_id: str) -> int | None:
        """One request of a client that has authenticated: None if allowed, else the seconds
        after which a retry may succeed."""
        limit = self._limits.get(client_id)
        if limit is None:
            return None
        return self._buckets.take([(("client", client_id), limit)], self._clock())

    def take_failure(self, peer: str, claimed_client_id: str | None) -> int | None:
        """One failed authentication from ``peer``: None while the peer (and, for a claim naming
        no configured client, everyone guessing ids) is within budget, else the seconds to wait.
        The limit is the default one; without a default, the claimed client's own, if any."""
        limit = self._default
        if limit is None and claimed_client_id is not None:
            limit = self._limits.get(claimed_client_id)
        if limit is None:
            return None
        charges: list[Charge] = [(("peer", peer, limit.per_second, limit.burst), limit)]
        if claimed_client_id not in self._configured:
            charges.append((("unknown", limit.per_second, limit.burst), limit))
        return self._buckets.take(charges, self._clock())

    def close(self) -> None:
        if isinstance(self._buckets, RedisBuckets):
            self._buckets.close()


def _refill(bucket: _Bucket, limit: RateLimitConfig, now: float) -> None:
    elapsed = max(0.0, now - bucket.updated_at)
    bucket.tokens = min(float(limit.burst), bucket.tokens + elapsed * limit.per_second)
    bucket.updated_at = now


def _wait(bucket: _Bucket, limit: RateLimitConfig) -> int:
    return max(1, math.ceil((1.0 - bucket.tokens) / limit.per_second))


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
