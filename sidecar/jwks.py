"""JWK Sets from a file or a URL: fetched with a short timeout and a size cap, parsed once into
verification keys, cached, refreshed on a schedule and (rate-limited) on an unknown ``kid``.

Used for trusted issuers' keys and for the keys of ``private_key_jwt`` clients. A malformed key
in a set is skipped with a warning; the good keys of the same set are kept.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from jwt import PyJWK

from sidecar.errors import TemporarilyUnavailableError
from sidecar.exchange.subject import VerificationKey, jwk_algorithms

log = logging.getLogger(__name__)

MAX_JWKS_BYTES = 512 * 1024
MAX_JWKS_KEYS = 100
MIN_RSA_BITS = 2048


class JwksUnavailable(Exception):
    """The key set could not be fetched or parsed at all."""


def parse_jwks(
    document: Any, allowed: frozenset[str], *, source: str
) -> dict[str, VerificationKey]:
    """Parse a JWK Set into verification keys by kid, skipping (and logging) unusable keys."""
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise JwksUnavailable(f"{source}: not a JWK Set")
    keys: dict[str, VerificationKey] = {}
    for index, jwk in enumerate(document["keys"][:MAX_JWKS_KEYS]):
        try:
            keys.update(_parse_jwk(jwk, allowed))
        except Exception as exc:  # one bad key must not discard the good ones
            log.warning("%s: skipping key #%d: %s", source, index, type(exc).__name__)
    return keys


def _parse_jwk(jwk: Any, allowed: frozenset[str]) -> dict[str, VerificationKey]:
    if not isinstance(jwk, Mapping):
        raise ValueError("not an object")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise ValueError("no kid")
    if jwk.get("use", "sig") != "sig":
        return {}
    algorithms = jwk_algorithms(jwk, allowed)
    if not algorithms:
        return {}
    # Only the public members are used, even if a careless IdP publishes private ones.
    public_members = {k: v for k, v in jwk.items() if k not in ("d", "p", "q", "dp", "dq", "qi")}
    key = PyJWK(dict(public_members), algorithm=next(iter(sorted(algorithms)))).key
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise ValueError("RSA key too small")
    return {kid: VerificationKey(kid=kid, key=key, algorithms=algorithms)}


def _read_body(response: Any, url: str, deadline: float) -> bytes:
    # `timeout` bounds each socket read; the deadline bounds the whole body, so a server that
    # trickles bytes cannot hold the fetch (and the single-flight lock) open indefinitely.
    body = bytearray()
    while len(body) <= MAX_JWKS_BYTES:
        if time.monotonic() > deadline:
            raise JwksUnavailable(f"{url}: fetch took too long")
        # read1: return what has arrived (one socket read) rather than block for a full chunk.
        chunk = response.raw.read1(16 * 1024, decode_content=True)
        if not chunk:
            break
        body += chunk
    return bytes(body)


def fetch_json(url: str, timeout: float) -> Any:
    """GET a JSON document: no redirects followed, bounded in time and size."""
    # Imported here: an HTTP client with TLS costs each worker about 16 MB, and a service that
    # reads its issuers' keys from files never needs one.
    import requests
    import urllib3

    deadline = time.monotonic() + timeout
    try:
        with requests.get(
            url,
            timeout=timeout,
            allow_redirects=False,
            stream=True,
            headers={"Accept": "application/json"},
        ) as response:
            if response.status_code != 200:
                raise JwksUnavailable(f"{url}: HTTP {response.status_code}")
            body = _read_body(response, url, deadline)
    # Reading `response.raw` raises urllib3's own errors (e.g. ReadTimeoutError), which
    # requests does not wrap.
    except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
        raise JwksUnavailable(f"{url}: {type(exc).__name__}") from exc
    if len(body) > MAX_JWKS_BYTES:
        raise JwksUnavailable(f"{url}: response too large")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise JwksUnavailable(f"{url}: not JSON") from exc


def read_json_file(path: Path) -> Any:
    try:
        with path.open("rb") as handle:
            body = handle.read(MAX_JWKS_BYTES + 1)
    except OSError as exc:
        raise JwksUnavailable(f"{path}: {exc.strerror}") from exc
    if len(body) > MAX_JWKS_BYTES:
        raise JwksUnavailable(f"{path}: file too large")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise JwksUnavailable(f"{path}: not JSON") from exc


@dataclass(frozen=True, slots=True)
class RefreshRules:
    refresh_interval: float  # scheduled refresh
    min_refetch_interval: float  # minimum gap between fetches triggered by an unknown kid
    fetch_timeout: float
    max_stale: float = 3600.0  # cached keys older than this (issuer unreachable) are not used


def _ignore(*_: object) -> None:
    return None


class JwksSource:
    """A cached JWK Set from a URL, a file, or a fixed document."""

    def __init__(
        self,
        *,
        name: str,
        allowed: frozenset[str],
        rules: RefreshRules,
        clock: Callable[[], float],
        url: str | None = None,
        path: Path | None = None,
        document: Any = None,
        fetch: Callable[[str, float], Any] = fetch_json,
    ) -> None:
        self._name = name
        self._allowed = allowed
        self._rules = rules
        self._clock = clock
        self._url = url
        self._path = path
        self._fetch = fetch
        self._lock = threading.Lock()
        # Told of every fetch of the set and its outcome ("ok" or "failed"): the metrics.
        self.observe: Callable[[str, str], None] = _ignore
        self._keys: dict[str, VerificationKey] | None = None
        self._loaded_at = float("-inf")
        self._attempted_at = float("-inf")
        self._refresher: threading.Thread | None = None
        # A fixed document is never refreshed or refetched: there is nothing to fetch it from.
        self._fixed = document is not None
        if document is not None:
            self._keys = parse_jwks(document, allowed, source=name)
            self._loaded_at = float("inf")

    def _load(self) -> dict[str, VerificationKey]:
        if self._url is not None:
            document = self._fetch(self._url, self._rules.fetch_timeout)
        else:
            assert self._path is not None
            document = read_json_file(self._path)
        return parse_jwks(document, self._allowed, source=self._name)

    def _refresh(self, *, wait: bool) -> None:
        # Single flight: one thread fetches; the others keep using the cached keys, or (when
        # nothing is cached) wait for that one fetch instead of starting their own.
        timeout = self._rules.fetch_timeout + 1 if wait else -1
        if not self._lock.acquire(blocking=wait, timeout=timeout):
            return
        try:
            now = self._clock()
            # With keys cached, refetches are rate-limited; with none, retry at most every second.
            gap = self._rules.min_refetch_interval if self._keys is not None else 1.0
            if now - self._attempted_at < gap:
                return
            self._attempted_at = now
            try:
                keys = self._load()
                if not keys and self._keys:
                    # A set with no usable key at all is garbage, not a rotation: keep the
                    # cached keys (within max_stale) rather than refuse every token.
                    raise JwksUnavailable(f"{self._name}: no usable key in the set")
                self._keys = keys
                self._loaded_at = self._clock()
                self.observe(self._name, "ok")
            except JwksUnavailable as exc:
                log.warning("key set %s unavailable: %s", self._name, exc)
                self.observe(self._name, "failed")
        finally:
            self._lock.release()

    def _refresh_in_background(self) -> None:
        # A scheduled refresh never holds up a request: the cached keys serve meanwhile.
        if self._lock.locked() or (self._refresher is not None and self._refresher.is_alive()):
            return
        self._refresher = threading.Thread(
            target=self._refresh, kwargs={"wait": False}, name=f"jwks-{self._name}", daemon=True
        )
        self._refresher.start()

    def join_refresh(self) -> None:
        """Wait (bounded) for a background refresh under way, if any."""
        refresher = self._refresher
        if refresher is not None and refresher.is_alive():
            refresher.join(self._rules.fetch_timeout + 1)

    def find_key(self, kid: str) -> VerificationKey | None:
        now = self._clock()
        if self._keys is None:
            self._refresh(wait=True)
        elif now - self._loaded_at >= self._rules.refresh_interval:
            self._refresh_in_background()
        keys = self._keys
        if keys is None:
            raise TemporarilyUnavailableError(reason=f"keys of {self._name} unavailable")
        if now - self._loaded_at > self._rules.max_stale:
            # The issuer has been unreachable for too long: a key it revoked meanwhile must not
            # keep verifying tokens forever. Fail closed.
            raise TemporarilyUnavailableError(reason=f"keys of {self._name} are stale")
        key = keys.get(kid)
        if key is None and not self._fixed:
            # A refresh under way may be bringing this kid: wait for it rather than refetch.
            self.join_refresh()
            key = (self._keys or {}).get(kid)
        if (
            key is None
            and not self._fixed
            and now - self._attempted_at >= self._rules.min_refetch_interval
        ):
            # An unknown kid may mean the issuer rotated: refetch, at most once per interval.
            self._refresh(wait=True)
            keys = self._keys or {}
            key = keys.get(kid)
        return key
