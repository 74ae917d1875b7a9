"""The token-exchange grant (RFC 8693 §2), end to end over already-authenticated input:
https://www.rfc-editor.org/rfc/rfc8693#section-2

A protocol core: it takes plain inputs (the authenticated client's id, the parsed form, the
current policy set, the signing key, the time) and returns an :data:`Outcome`, granted or
refused, carrying everything the audit trail records. It does no I/O of its own; the one thing
it needs from outside, the keys of a trusted issuer, comes through the small
:class:`~sidecar.exchange.subject.IssuerDirectory` interface.

It sits *beside* Authlib's AuthorizationServer rather than on it: Authlib 1.x ships no RFC 8693
grant, and its request wrapper would hide what this endpoint must control exactly (form body only,
repeatable ``audience``/``resource``, every other parameter at most once).

Steps, each a function of the previous step's result: parse (RFC 8693 §2.1) -> verify the
subject and actor tokens (RFC 7519 §7.2, RFC 9068 §4) -> policy decision -> claims (RFC 9068
§2.2, RFC 8693 §4.1 ``act``) -> sign (RFC 7515).
"""

from __future__ import annotations

import base64
import os
import threading
from dataclasses import dataclass, field, replace
from typing import Any

from sidecar.errors import (
    InvalidRequestError,
    InvalidTargetError,
    ProtocolError,
    TemporarilyUnavailableError,
)
from sidecar.exchange.caches import MintedKey, MintedToken, MintedTokenCache, SubjectTokenCache
from sidecar.exchange.claims import build_claims, check_may_act
from sidecar.exchange.credentials import UpstreamCredentials
from sidecar.exchange.policy import MINT, Decision, PolicySet, decide
from sidecar.exchange.request import (
    ACCESS_TOKEN_TYPE,
    FormParams,
    TokenExchangeRequest,
    parse_token_exchange,
)
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

    access_token: str = field(repr=False)
    issued_token_type: str
    expires_in: int
    scope: str
    token_type: str = "Bearer"
    credential_header: str | None = None  # an API key sent in a header of its own (N_A)

    def as_dict(self) -> dict[str, Any]:
        body = {
            "access_token": self.access_token,
            "issued_token_type": self.issued_token_type,
            "token_type": self.token_type,
            "expires_in": self.expires_in,
            "scope": self.scope,
        }
        if self.credential_header is not None:
            body["credential_header"] = self.credential_header
        return body


@dataclass(frozen=True, slots=True)
class Facts:
    """What the audit trail records of an exchange, as far as it got."""

    audiences: tuple[str, ...] = ()
    subject: str | None = None
    subject_issuer: str | None = None
    subject_token_sha256: str | None = None
    actor: str | None = None


@dataclass(frozen=True, slots=True)
class Granted:
    response: TokenResponse
    facts: Facts
    jti: str | None  # None: an upstream's own credential, not a token of ours
    kid: str | None
    expires_at: int
    reused: bool  # a still-fresh token minted earlier for the same request (caches.minted_tokens)
    policies: tuple[str, ...] = ()  # the granting policies, "name@version"
    credential: str = MINT  # mint, or the upstream credential's mode
    upstream: str | None = None  # the upstream whose own credential was handed out


@dataclass(frozen=True, slots=True)
class Refused:
    error: ProtocolError
    facts: Facts


Outcome = Granted | Refused


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
    """The grant's fixed parts (configuration, issuers' keys, caches); :meth:`exchange` is
    called with what changes from one request to the next."""

    def __init__(
        self,
        *,
        issuer: str,
        max_ttl: int,
        leeway: int,
        issuers: IssuerDirectory,
        signer: TokenSigner | None = None,
        subject_cache: SubjectTokenCache | None = None,
        minted_cache: MintedTokenCache | None = None,
        upstreams: UpstreamCredentials | None = None,
    ) -> None:
        self._issuer = issuer
        self._upstreams = upstreams
        self._max_ttl = max_ttl
        self._leeway = leeway
        self._issuers = issuers
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
        *,
        policies: PolicySet,
        now: int,
    ) -> Decision:
        """The decision over verified input: shared by /token and ``sidecar policy explain``."""
        if actor is not None:
            check_may_act(subject, actor)
        return decide(client_id, targets, scopes, subject, policies, max_ttl=self._max_ttl, now=now)

    def exchange(
        self,
        client_id: str,
        params: FormParams,
        *,
        policies: PolicySet,
        signing_key: SigningKey,
        now: float,
    ) -> Outcome:
        """Exchange for the authenticated ``client_id``: granted, or refused with the protocol
        error that says why and the facts known by then. Raises only on a bug."""
        facts = Facts()
        try:
            request = parse_token_exchange(params)
            facts = replace(facts, audiences=request.targets)
            subject, subject_digest = self.verify(request.subject_token, now)
            facts = replace(
                facts,
                subject=subject.subject,
                subject_issuer=subject.issuer,
                subject_token_sha256=subject.fingerprint,
            )
            actor = actor_digest = None
            if request.actor_token is not None:
                actor, actor_digest = self.verify(request.actor_token, now, role="actor")
                facts = replace(facts, actor=actor.subject)
            decision = self.evaluate(
                client_id,
                request.targets,
                request.scopes,
                subject,
                actor,
                policies=policies,
                now=int(now),
            )
            if decision.credential != MINT:
                return self._hand_out(request, decision, int(now), facts, policies)
            cache_key: MintedKey = (
                client_id,
                subject_digest,
                actor_digest,
                request.targets,
                request.scopes,
                request.requested_token_type,
            )
            # (Copying a prior act chain into the claims can still refuse.)
            return self._mint(
                client_id,
                request,
                subject,
                actor,
                decision,
                signing_key,
                int(now),
                cache_key,
                facts,
                _versions(decision, policies),
            )
        except ProtocolError as error:
            return Refused(error, facts)

    def _mint(
        self,
        client_id: str,
        request: TokenExchangeRequest,
        subject: VerifiedToken,
        actor: VerifiedToken | None,
        decision: Decision,
        key: SigningKey,
        now: int,
        cache_key: MintedKey,
        facts: Facts,
        granted_by: tuple[str, ...],
    ) -> Granted:
        """A token for the decision: a still-fresh one minted for the same request, or a new one."""
        if self.minted_cache is not None:
            reused = self.minted_cache.get(cache_key, decision, key.kid, now)
            if reused is not None:
                response = TokenResponse(
                    access_token=reused.access_token,
                    issued_token_type=request.requested_token_type,
                    expires_in=reused.expires_at - now,
                    scope=reused.scope,
                )
                return Granted(
                    response,
                    facts,
                    reused.jti,
                    reused.kid,
                    reused.expires_at,
                    reused=True,
                    policies=granted_by,
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
        response = TokenResponse(
            access_token=token,
            issued_token_type=request.requested_token_type,
            expires_in=decision.lifetime,
            scope=claims["scope"],
        )
        return Granted(
            response,
            facts,
            claims["jti"],
            key.kid,
            claims["exp"],
            reused=False,
            policies=granted_by,
        )

    def _hand_out(
        self,
        request: TokenExchangeRequest,
        decision: Decision,
        now: int,
        facts: Facts,
        policies: PolicySet,
    ) -> Granted:
        """The upstream's own credential (static or client_credentials) for the decision."""
        if request.requested_token_type != ACCESS_TOKEN_TYPE:
            raise InvalidRequestError(
                "The requested token type is not available for this audience.",
                reason=f"requested_token_type is not issued for {decision.credential} audiences",
            )
        if self._upstreams is None or decision.upstream is None:
            raise InvalidTargetError(reason="no upstream credentials are configured")
        issued = self._upstreams.credential(
            decision.upstream, decision.scopes, decision.audiences[0], decision.credential
        )
        lifetime = decision.lifetime
        if issued.expires_in is not None:
            lifetime = min(lifetime, issued.expires_in)
        if lifetime <= 0:
            raise TemporarilyUnavailableError(
                reason=f"upstream {decision.upstream}: its token expires too soon"
            )
        response = TokenResponse(
            access_token=issued.access_token,
            issued_token_type=issued.issued_token_type,
            expires_in=lifetime,
            scope=issued.scope if issued.scope is not None else " ".join(decision.scopes),
            token_type=issued.token_type,
            credential_header=issued.header,
        )
        return Granted(
            response,
            facts,
            None,
            None,
            now + lifetime,
            reused=False,
            policies=_versions(decision, policies),
            credential=decision.credential,
            upstream=decision.upstream,
        )


def _versions(decision: Decision, policies: PolicySet) -> tuple[str, ...]:
    """The granting policies as ``name@version`` (the version the store loaded them at)."""
    return tuple(f"{p.name}@{policies.version_of(p.name) or '?'}" for p in decision.policies)
