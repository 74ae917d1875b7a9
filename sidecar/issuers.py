"""Trusted issuers of subject and actor tokens (``trusted_issuers``; docs/design.md §2 step 2).

Each entry holds its own key set, audiences and algorithm allowlist; keys are looked up by
(issuer, kid) in that issuer's set only, so a token of one issuer can never be verified with a
key of another.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from sidecar.config import Settings, TrustedIssuerConfig
from sidecar.exchange.subject import VerificationKey
from sidecar.jwks import JwksSource, RefreshRules, fetch_json


class TrustedIssuer:
    def __init__(
        self,
        config: TrustedIssuerConfig,
        *,
        jwks_path: Path | None,
        clock: Callable[[], float],
        fetch: Callable[[str, float], object] = fetch_json,
    ) -> None:
        self.issuer = config.issuer
        self.audiences = tuple(config.audiences)
        self.algorithms = frozenset(config.algorithms)
        self._keys = JwksSource(
            name=config.issuer,
            allowed=self.algorithms,
            rules=RefreshRules(
                refresh_interval=config.refresh_interval,
                min_refetch_interval=config.min_refetch_interval,
                fetch_timeout=config.fetch_timeout,
                max_stale=config.max_stale,
            ),
            clock=clock,
            url=config.jwks_uri,
            path=jwks_path,
            fetch=fetch,
        )

    def find_key(self, kid: str) -> VerificationKey | None:
        return self._keys.find_key(kid)

    def observe_fetches(self, observe: Callable[[str, str], None]) -> None:
        self._keys.observe = observe


class IssuerDirectory:
    def __init__(
        self,
        settings: Settings,
        clock: Callable[[], float],
        fetch: Callable[[str, float], object] = fetch_json,
        *,
        entries: Sequence[TrustedIssuerConfig] | None = None,
    ) -> None:
        """The issuers of ``entries`` (default: the settings' ``trusted_issuers``)."""
        self._issuers = {
            entry.issuer: TrustedIssuer(
                entry,
                jwks_path=settings.resolve_path(entry.jwks_file) if entry.jwks_file else None,
                clock=clock,
                fetch=fetch,
            )
            for entry in (settings.trusted_issuers if entries is None else entries)
        }

    def observe_fetches(self, observe: Callable[[str, str], None]) -> None:
        """Tell ``observe(issuer, outcome)`` of every JWKS fetch (the metrics)."""
        for issuer in self._issuers.values():
            issuer.observe_fetches(observe)

    def find_issuer(self, issuer: str) -> TrustedIssuer | None:
        # Exact, byte-for-byte: no case folding, no trailing-slash normalisation.
        return self._issuers.get(issuer)
