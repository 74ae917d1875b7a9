"""The audit trail: every exchange decision, granted or denied, with the reason.

Never a token or a secret: a subject token appears as a short SHA-256 prefix, a minted token as its
``jti``. Each event is written to the database and to the ``sidecar.audit`` log as one JSON line.
A granted exchange whose audit record cannot be written is not answered with a token (fail closed).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from sidecar.errors import TemporarilyUnavailableError
from sidecar.store.models import AuditEventRow

log = logging.getLogger("sidecar.audit")

GRANTED, DENIED = "granted", "denied"
FAILURE_BACKOFF = 1.0  # seconds


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


class AuditTrail:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._failed_at = float("-inf")

    def record(self, event: AuditEvent) -> None:
        """Write the event; raises TemporarilyUnavailableError if a *grant* cannot be recorded.

        After a failed write, denials are only logged for a second: a request refused because
        the database is down must not wait for the database a second time."""
        values = asdict(event)
        line = json.dumps(values, separators=(",", ":"))
        if event.decision != GRANTED:
            log.info("exchange %s", line)
            if time.monotonic() - self._failed_at < FAILURE_BACKOFF:
                return
        values["audiences"] = json.dumps(event.audiences)
        # Column limits: a long `sub` from an IdP must not turn a grant into a failed insert.
        for name in ("reason", "subject", "actor", "client_id"):
            if values[name] is not None:
                values[name] = values[name][:255]
        try:
            with self._sessions() as session, session.begin():
                session.add(AuditEventRow(**values))
        except SQLAlchemyError as exc:
            self._failed_at = time.monotonic()
            log.error("audit record not written: %s", type(exc).__name__)
            if event.decision == GRANTED:
                # No token leaves: the log shows the denial that follows, not this grant.
                raise TemporarilyUnavailableError(reason="audit trail unavailable") from exc
            return
        if event.decision == GRANTED:
            log.info("exchange %s", line)
