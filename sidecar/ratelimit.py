"""Per-client rate limiting of the token endpoint: a token bucket per client, in each worker
process, checked before any signature work so that overload is shed cheaply (429 +
``Retry-After``). The client is the one the request *claims* to be; requests naming no configured
client share one bucket, so unknown ids cannot grow the table."""

from __future__ import annotations

import base64
import binascii
import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

from sidecar.config import RateLimitConfig, Settings
from sidecar.exchange.request import FormParams

UNKNOWN_CLIENT = "(unknown)"


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated_at: float


class RateLimiter:
    def __init__(self, settings: Settings, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._limits: dict[str, RateLimitConfig] = {}
        for client in settings.clients:
            limit = client.rate_limit or settings.rate_limit
            if limit is not None:
                self._limits[client.client_id] = limit
        if settings.rate_limit is not None:
            self._limits[UNKNOWN_CLIENT] = settings.rate_limit
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        """Whether any limit is configured (else nothing needs to be read for a bucket)."""
        return bool(self._limits)

    def retry_after(self, claimed_client_id: str | None) -> int | None:
        """Take one request from the client's bucket: None if allowed, else the seconds after
        which a retry may succeed."""
        key = claimed_client_id if claimed_client_id in self._limits else UNKNOWN_CLIENT
        limit = self._limits.get(key)
        if limit is None:
            return None
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(float(limit.burst), now)
            elapsed = max(0.0, now - bucket.updated_at)
            bucket.tokens = min(float(limit.burst), bucket.tokens + elapsed * limit.per_second)
            bucket.updated_at = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return None
            return max(1, math.ceil((1.0 - bucket.tokens) / limit.per_second))


def claimed_client_id(form: FormParams, authorization: str | None) -> str | None:
    """Who the request says it is, read without any verification (never trusted beyond picking
    a rate-limit bucket): the client_id parameter, the Basic user, or an assertion's sub."""
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
        except (binascii.Error, ValueError):
            return None
        sub = unverified_claims.get("sub") if isinstance(unverified_claims, dict) else None
        return sub if isinstance(sub, str) else None
    return None
