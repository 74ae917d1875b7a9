"""``sidecar policy explain``: the decision the running service would make for an exchange, and
why, without minting anything. It runs the same steps as ``/token`` after client authentication
(the client's grant types, target parsing, subject verification, and
:meth:`sidecar.exchange.grant.TokenExchangeGrant.evaluate`, which calls the one decision
function), so the two cannot disagree."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar.errors import (
    InvalidClientError,
    InvalidRequestError,
    ProtocolError,
    UnauthorizedClientError,
)
from sidecar.exchange.request import TOKEN_EXCHANGE_GRANT, parse_resource, parse_scope
from sidecar.exchange.subject import ID_TOKEN_CLAIMS, VerifiedToken, scopes_of, verify_token
from sidecar.services import Services


def verified_from_claims(claims: Mapping[str, Any], *, now: int, max_ttl: int) -> VerifiedToken:
    """Claims given on the command line, taken as if a subject token carrying them had been
    verified (its signature, issuer keys and audience are not checked: `--subject-token` does)."""
    issuer, subject = claims.get("iss"), claims.get("sub")
    if not isinstance(issuer, str) or not isinstance(subject, str) or not subject:
        raise InvalidRequestError(reason="claims need string iss and sub")
    exp = claims.get("exp")
    if exp is not None and (isinstance(exp, bool) or not isinstance(exp, int | float)):
        raise InvalidRequestError(reason="subject token exp is not a number")  # as /token says
    expires_at = now + max_ttl if exp is None else int(exp)
    return VerifiedToken(
        issuer=issuer,
        subject=subject,
        claims=dict(claims),
        scopes=scopes_of(claims),
        expires_at=expires_at,
        fingerprint="(claims)",
    )


def explain(
    services: Services,
    *,
    client_id: str,
    audiences: tuple[str, ...],
    resources: tuple[str, ...],
    scope: str | None,
    subject: Mapping[str, Any] | str,
    now: int,
) -> dict[str, Any]:
    settings = services.settings
    result: dict[str, Any] = {"decision": "denied", "client_id": client_id}
    try:
        client = services.authenticator.clients.get(client_id)
        if client is None:
            raise InvalidClientError(reason="no such client")
        if not client.check_grant_type(TOKEN_EXCHANGE_GRANT):
            raise UnauthorizedClientError(reason="client may not use token exchange")
        targets = tuple(dict.fromkeys((*audiences, *(parse_resource(r) for r in resources))))
        if not targets:
            raise InvalidRequestError(reason="no target requested")
        scopes = parse_scope(scope)
        if isinstance(subject, str):
            verified = verify_token(subject, services.issuers, leeway=settings.tokens.leeway)
        else:
            verified = verified_from_claims(subject, now=now, max_ttl=settings.tokens.max_ttl)
            # What /token refuses before any policy is consulted, claims can show as well.
            if services.issuers.find_issuer(verified.issuer) is None:
                raise InvalidRequestError(reason="subject token issuer is not trusted")
            if any(name in verified.claims for name in ID_TOKEN_CLAIMS):
                raise InvalidRequestError(reason="subject token is an ID token")
        decision = services.grant.evaluate(
            client_id, targets, scopes, verified, None, policies=services.policies.get(), now=now
        )
    except ProtocolError as exc:
        result.update(error=exc.error, reason=exc.reason)
        return result
    result.update(
        decision="granted",
        policies=[p.name for p in decision.policies],
        audience=list(decision.audiences),
        scope=list(decision.scopes),
        lifetime=decision.lifetime,
        copied_claims=[name for name in decision.copy_claims if name in verified.claims],
        credential=decision.credential,
    )
    if decision.upstream is not None:
        result["upstream"] = decision.upstream
    return result
