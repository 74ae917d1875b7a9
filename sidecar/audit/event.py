"""One exchange decision as the audit trail records it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from sidecar.errors import ProtocolError
from sidecar.exchange.grant import Facts, Granted

GRANTED, DENIED = "granted", "denied"


@dataclass(slots=True)
class AuditEvent:
    """One decision at the token endpoint: a denial records how far the request got."""

    at: float
    decision: str = DENIED
    error: str | None = None
    reason: str | None = None
    client_id: str | None = None
    subject: str | None = None
    subject_issuer: str | None = None
    subject_token_sha256: str | None = None
    actor: str | None = None
    audiences: list[str] = field(default_factory=list)
    scope: str | None = None
    jti: str | None = None
    expires_at: float | None = None
    kid: str | None = None
    request_id: str | None = None
    latency_ms: float | None = None
    policies: str | None = None  # on a grant: "name@version ..." of the granting policies


def granted_event(
    at: float,
    client_id: str,
    granted: Granted,
    *,
    request_id: str | None = None,
    latency_ms: float | None = None,
) -> AuditEvent:
    return AuditEvent(
        at=at,
        decision=GRANTED,
        reason=_grant_reason(granted),
        client_id=client_id,
        scope=granted.response.scope,
        jti=granted.jti,
        expires_at=granted.expires_at,
        kid=granted.kid,
        request_id=request_id,
        latency_ms=latency_ms,
        policies=" ".join(granted.policies) or None,
        **_facts(granted.facts),
    )


def _grant_reason(granted: Granted) -> str | None:
    if granted.upstream is not None:
        return f"{granted.credential} credential of upstream {granted.upstream}"
    return "reused a minted token" if granted.reused else None


def denied_event(
    at: float,
    client_id: str | None,
    error: ProtocolError,
    facts: Facts | None = None,
    *,
    request_id: str | None = None,
    latency_ms: float | None = None,
) -> AuditEvent:
    """A refusal: no token was sent, so none is recorded (not even a grant refused late, when its
    audit record could not be queued)."""
    return AuditEvent(
        at=at,
        decision=DENIED,
        error=error.error,
        reason=error.reason,
        client_id=client_id,
        request_id=request_id,
        latency_ms=latency_ms,
        **(_facts(facts) if facts is not None else {}),
    )


def _facts(facts: Facts) -> dict[str, Any]:
    return {
        "audiences": list(facts.audiences),
        "subject": facts.subject,
        "subject_issuer": facts.subject_issuer,
        "subject_token_sha256": facts.subject_token_sha256,
        "actor": facts.actor,
    }


FIELDS = tuple(f.name for f in fields(AuditEvent))
