"""The sidecar's JWKS as the verifier holds it: fetched lazily, cached, refetched at a bounded
rate, and parsed into one key (and one algorithm) per ``kid``."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
import requests

from .errors import JwksUnavailable

log = logging.getLogger(__package__)  # the package's logger, as before the module was split

CURVE_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "Ed25519": "EdDSA"}
PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
MAX_JWKS_BYTES = 512 * 1024


@dataclass(frozen=True, slots=True)
class Key:
    algorithm: str  # the only algorithm this key verifies: its JWK `alg`, or its curve's
    key: Any


@dataclass
class JwksCache:
    """The sidecar's JWKS, fetched lazily, reused for ``cache_ttl`` seconds, and refetched (on
    expiry or an unknown ``kid``) at most once per ``refresh_interval`` under one lock, so that a
    flood of tokens with made-up ``kid`` values cannot turn into a flood of fetches."""

    uri: str
    algorithms: frozenset[str]
    refresh_interval: float
    cache_ttl: float
    max_stale: float
    timeout: float
    session: requests.Session
    clock: Callable[[], float]
    keys: dict[str, Key] = field(default_factory=dict)
    fetched_at: float | None = None
    last_attempt: float = float("-inf")
    lock: threading.Lock = field(default_factory=threading.Lock)

    def find_key(self, kid: str) -> Key | None:
        if kid not in self.keys or self._expired():
            with self.lock:  # one fetch at a time: the other threads wait for its keys
                if (kid not in self.keys or self._expired()) and self._may_fetch():
                    self._refresh()
        if self.fetched_at is None:
            raise JwksUnavailable("no JWKS fetched")
        if self.clock() - self.fetched_at > self.max_stale:
            # Fail closed: a key retired (or compromised) meanwhile must not verify for ever.
            raise JwksUnavailable("JWKS older than max_stale")
        return self.keys.get(kid)

    def _expired(self) -> bool:
        return self.fetched_at is None or self.clock() - self.fetched_at >= self.cache_ttl

    def _may_fetch(self) -> bool:
        return self.clock() - self.last_attempt >= self.refresh_interval

    def _refresh(self) -> None:
        self.last_attempt = self.clock()
        try:
            keys = self._parse(self._fetch())
        except (requests.RequestException, ValueError, RecursionError, JwksUnavailable) as exc:
            # Keys already held stay in use: a brief outage must not refuse valid tokens.
            log.warning("JWKS fetch from %s failed: %s", self.uri, type(exc).__name__)
            return
        self.keys, self.fetched_at = keys, self.clock()

    def _fetch(self) -> Any:
        with self.session.get(
            self.uri,
            timeout=self.timeout,
            allow_redirects=False,  # the keys come from the configured URL, nowhere else
            stream=True,
            headers={"Accept": "application/json"},
        ) as response:
            if response.status_code != 200:
                raise JwksUnavailable(f"HTTP {response.status_code}")
            body = b""
            for chunk in response.iter_content(64 * 1024):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise JwksUnavailable("JWKS too large")
        return json.loads(body)

    def _parse(self, document: Any) -> dict[str, Key]:
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise JwksUnavailable("not a JWK Set")
        keys: dict[str, Key] = {}
        for jwk in document["keys"]:
            if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
                continue
            kid, algorithm = jwk.get("kid"), jwk_algorithm(jwk)
            if not isinstance(kid, str) or algorithm is None or algorithm not in self.algorithms:
                continue
            # Only the public members: a careless publisher's private ones are never loaded.
            public = {name: value for name, value in jwk.items() if name not in PRIVATE_MEMBERS}
            try:
                keys[kid] = Key(algorithm, jwt.PyJWK(public, algorithm=algorithm).key)
            except Exception as exc:  # one bad key must not discard the good ones
                log.warning("JWKS %s: skipping key %r: %s", self.uri, kid, type(exc).__name__)
        return keys


def jwk_algorithm(jwk: Mapping[str, Any]) -> str | None:
    # Without `alg`: the curve's algorithm, or RS256 for RSA (PyJWT's reading of such a key).
    # PyJWK then refuses a key whose `kty` does not fit.
    algorithm = jwk.get("alg") or CURVE_ALGORITHMS.get(str(jwk.get("crv")), "RS256")
    return algorithm if isinstance(algorithm, str) else None
