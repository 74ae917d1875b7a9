"""``sidecar policy explain``: the decision the running service would make for an exchange, and
why, without minting anything. It runs the same steps as ``/token`` after client authentication
(the client's grant types, target parsing, subject verification, and
:meth:`sidecar.exchange.grant.TokenExchangeGrant.evaluate`, which calls the one decision
function), so the two cannot disagree.

It decides with the live policy table unless given a :class:`PolicySet` of its own: a proposed
policy file (``explain --policies FILE``, ``sidecar policy test``) is judged by the same code
before it ships."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sidecar.config import Settings, load_policies_file
from sidecar.errors import (
    InvalidClientError,
    InvalidRequestError,
    ProtocolError,
    UnauthorizedClientError,
)
from sidecar.exchange.policy import PolicySet
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


def policies_from_file(path: Path, settings: Settings) -> PolicySet:
    """The ``policies:`` of a policy or config file, validated as ``policy apply`` validates
    them (clients, issuers, upstreams, overlaps): raises ConfigError naming the policy."""
    return PolicySet(p.to_policy() for p in load_policies_file(path, settings))


def _verified(
    services: Services, token_or_claims: Mapping[str, Any] | str, *, role: str, now: int
) -> VerifiedToken:
    settings = services.settings
    if isinstance(token_or_claims, str):
        return verify_token(
            token_or_claims, services.issuers, leeway=settings.tokens.leeway, role=role
        )
    verified = verified_from_claims(token_or_claims, now=now, max_ttl=settings.tokens.max_ttl)
    # What /token refuses before any policy is consulted, claims can show as well.
    if services.issuers.find_issuer(verified.issuer) is None:
        raise InvalidRequestError(reason=f"{role} token issuer is not trusted")
    if any(name in verified.claims for name in ID_TOKEN_CLAIMS):
        raise InvalidRequestError(reason=f"{role} token is an ID token")
    return verified


def explain(
    services: Services,
    *,
    client_id: str,
    audiences: tuple[str, ...],
    resources: tuple[str, ...],
    scope: str | None,
    subject: Mapping[str, Any] | str,
    now: int,
    actor: Mapping[str, Any] | str | None = None,
    policies: PolicySet | None = None,
) -> dict[str, Any]:
    """The decision for one exchange: ``subject`` (and ``actor``) a token, verified as /token
    verifies it, or claims taken as verified; ``policies`` instead of the live table."""
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
        verified = _verified(services, subject, role="subject", now=now)
        acting = None if actor is None else _verified(services, actor, role="actor", now=now)
        decision = services.grant.evaluate(
            client_id,
            targets,
            scopes,
            verified,
            acting,
            policies=services.policies.get() if policies is None else policies,
            now=now,
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


def yaml_scalar(value: Any) -> str:
    """A value of the result as YAML spells it (``true``, ``false``, ``null``, ``[]``), a list
    of names space-separated as ``scope`` is: never Python's ``True`` or ``None``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return " ".join(yaml_scalar(v) for v in value) if value else "[]"
    return str(value)


def explain_lines(result: Mapping[str, Any]) -> list[str]:
    """The result of :func:`explain` as ``key: value`` lines."""
    return [f"{key}: {yaml_scalar(value)}" for key, value in result.items()]
