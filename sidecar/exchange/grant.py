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

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sidecar.audit import GRANTED, AuditEvent
from sidecar.exchange.claims import build_claims, check_may_act
from sidecar.exchange.policy import Decision, PolicySet, decide
from sidecar.exchange.request import FormParams, parse_token_exchange
from sidecar.exchange.subject import IssuerDirectory, VerifiedToken, verify_token
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
    ) -> None:
        self._issuer = issuer
        self._max_ttl = max_ttl
        self._leeway = leeway
        self._issuers = issuers
        self._policies = policies
        self._signing_key = signing_key
        self._clock = clock
        self._signer = signer or TokenSigner()

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

        subject = verify_token(request.subject_token, self._issuers, leeway=self._leeway)
        event.subject, event.subject_issuer = subject.subject, subject.issuer
        event.subject_token_sha256 = subject.fingerprint

        actor = None
        if request.actor_token is not None:
            actor = verify_token(
                request.actor_token, self._issuers, leeway=self._leeway, role="actor"
            )
            event.actor = actor.subject

        now = int(self._clock())
        decision = self.evaluate(client_id, request.targets, request.scopes, subject, actor, now)
        key = self._signing_key()
        claims = build_claims(
            issuer=self._issuer,
            client_id=client_id,
            subject=subject,
            actor=actor,
            decision=decision,
            now=now,
            jti=secrets.token_urlsafe(16),
        )
        token = self._signer.sign(claims, key)
        event.decision, event.reason = GRANTED, None
        event.scope, event.jti, event.kid = claims["scope"], claims["jti"], key.kid
        event.expires_at = claims["exp"]
        return TokenResponse(
            access_token=token,
            issued_token_type=request.requested_token_type,
            expires_in=decision.lifetime,
            scope=claims["scope"],
        )
