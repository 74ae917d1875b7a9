"""One exchange decision as the audit trail records it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

GRANTED, DENIED = "granted", "denied"


@dataclass(slots=True)
class AuditEvent:
    """Filled in as an exchange progresses, so a denial records how far the request got."""

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


FIELDS = tuple(f.name for f in fields(AuditEvent))
