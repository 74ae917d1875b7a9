"""The token-exchange grant (RFC 8693 §2), end to end over already-authenticated input.

It sits *beside* Authlib's AuthorizationServer rather than on it: Authlib 1.x ships no RFC 8693
grant, and its request wrapper would hide what this endpoint must control exactly (form body only,
repeatable ``audience``/``resource``, every other parameter at most once). Authlib still does what
it does well here: client authentication (including private_key_jwt), the error types, and the
RFC 8414 metadata model.

Steps, each a function of the previous step's result: parse -> verify subject (and actor) token ->
policy decision -> claims -> sign.
"""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sidecar.audit import GRANTED, AuditEvent
from sidecar.exchange.caches import MintedKey, MintedToken, MintedTokenCache, SubjectTokenCache
from sidecar.exchange.claims import build_claims, check_may_act
from sidecar.exchange.policy import Decision, PolicySet, decide
from sidecar.exchange.request import FormParams, parse_token_exchange
from sidecar.exchange.subject import (
    IssuerDirectory,
    VerifiedToken,
    token_digest,
    verify_token_and_key,
)
from sidecar.keys.keyring import SigningKey, TokenSigner


@dataclass(frozen=True, slots=True)
class TokenResponse:
    """RFC 8693 §2.2.1 successful response."""

    access_token: str
    issued_token_type: str
    expires_in: int
    scope: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "issued_token_type": self.issued_token_type,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "scope": self.scope,
        }


class JtiSource:
    """Unique, unguessable ``jti`` values: 128 random bits each, from ``os.urandom``, read 4 KiB
    at a time (one system call per 256 tokens instead of one per token). A forked child never
    uses bytes its parent read."""

    SIZE = 16
    CHUNK = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._offset = 0
        self._pid = 0

    def __call__(self) -> str:
        with self._lock:
            if self._offset + self.SIZE > len(self._buffer) or self._pid != os.getpid():
                self._buffer, self._offset, self._pid = os.urandom(self.CHUNK), 0, os.getpid()
            start = self._offset
            self._offset += self.SIZE
            raw = self._buffer[start : start + self.SIZE]
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class TokenExchangeGrant:
    def __init__(
        self,
        *,
        issuer: str,
        max_ttl: int,
        leeway: int,
        issuers: IssuerDirectory,
        policies: Callable[[], PolicySet],
        signing_key: Callable[[], SigningKey],
        clock: Callable[[], float],
        signer: TokenSigner | None = None,
        subject_cache: SubjectTokenCache | None = None,
        minted_cache: MintedTokenCache | None = None,
    ) -> None:
        self._issuer = issuer
        self._max_ttl = max_ttl
        self._leeway = leeway
        self._issuers = issuers
        self._policies = policies
        self._signing_key = signing_key
        self._clock = clock
        self._signer = signer or TokenSigner()
        self._new_jti = JtiSource()
        self.subject_cache = subject_cache
        self.minted_cache = minted_cache

    def verify(self, token: str, now: float, role: str = "subject") -> tuple[VerifiedToken, bytes]:
        """A verified subject or actor token, from the cache when it was verified before; and
        the token's SHA-256."""
        digest = token_digest(token)
        cache = self.subject_cache
        if cache is None:
            verified, _ = verify_token_and_key(
                token, self._issuers, leeway=self._leeway, role=role, digest=digest
            )
            return verified, digest
        cached = cache.get(digest, now, count_miss=False)
        if cached is not None:
            return cached, digest
        try:
            verified, key = verify_token_and_key(
                token, self._issuers, leeway=self._leeway, role=role, digest=digest
            )
        except Exception:
            cache.stats.count(False)
            raise
        cache.stats.count(False)
        cache.put(digest, verified, key, now)
        return verified, digest

    def evaluate(
        self,
        client_id: str,
        targets: tuple[str, ...],
        scopes: tuple[str, ...] | None,
        subject: VerifiedToken,
        actor: VerifiedToken | None,
        now: int,
    ) -> Decision:
        """The decision over verified input: shared by /token and ``sidecar policy explain``."""
        if actor is not None:
            check_may_act(subject, actor)
        return decide(
            client_id, targets, scopes, subject, self._policies(), max_ttl=self._max_ttl, now=now
        )

    def exchange(self, client_id: str, params: FormParams, event: AuditEvent) -> TokenResponse:
        """Exchange, or raise the protocol error that refuses it; ``event`` records progress."""
        request = parse_token_exchange(params)
        event.audiences = list(request.targets)
        clock_now = self._clock()

        subject, subject_digest = self.verify(request.subject_token, clock_now)
        event.subject, event.subject_issuer = subject.subject, subject.issuer
        event.subject_token_sha256 = subject.fingerprint

        actor = actor_digest = None
        if request.actor_token is not None:
            actor, actor_digest = self.verify(request.actor_token, clock_now, role="actor")
            event.actor = actor.subject

        now = int(clock_now)
        decision = self.evaluate(client_id, request.targets, request.scopes, subject, actor, now)
        key = self._signing_key()
        cache_key: MintedKey = (
            client_id,
            subject_digest,
            actor_digest,
            request.targets,
            request.scopes,
            request.requested_token_type,
        )
        if self.minted_cache is not None:
            reused = self.minted_cache.get(cache_key, decision, key.kid, now)
            if reused is not None:
                event.decision, event.reason = GRANTED, "reused a minted token"
                event.scope, event.jti, event.kid = reused.scope, reused.jti, reused.kid
                event.expires_at = reused.expires_at
                return TokenResponse(
                    access_token=reused.access_token,
                    issued_token_type=request.requested_token_type,
                    expires_in=reused.expires_at - now,
                    scope=reused.scope,
                )

        claims = build_claims(
            issuer=self._issuer,
            client_id=client_id,
            subject=subject,
            actor=actor,
            decision=decision,
            now=now,
            jti=self._new_jti(),
        )
        token = self._signer.sign(claims, key)
        event.decision, event.reason = GRANTED, None
        event.scope, event.jti, event.kid = claims["scope"], claims["jti"], key.kid
        event.expires_at = claims["exp"]
        if self.minted_cache is not None:
            self.minted_cache.put(
                cache_key,
                MintedToken(
                    access_token=token,
                    kid=key.kid,
                    jti=claims["jti"],
                    scope=claims["scope"],
                    issued_at=now,
                    expires_at=claims["exp"],
                    decision=decision,
                ),
            )
        return TokenResponse(
            access_token=token,
            issued_token_type=request.requested_token_type,
            expires_in=decision.lifetime,
            scope=claims["scope"],
        )
