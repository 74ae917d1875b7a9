"""Reading the audit trail back: the newest exchanges and changes, and searches by time range,
client, subject, audience, outcome or kind, ``jti`` and ``kid`` (the indexes of migration 0004
serve the common ones)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select

from sidecar.store.actions import CHANGES, EXCHANGES
from sidecar.store.models import AuditEventRow

COLUMNS = (
    "at",
    "decision",
    "error",
    "reason",
    "client_id",
    "subject",
    "subject_issuer",
    "subject_token_sha256",
    "actor",
    "audiences",
    "scope",
    "jti",
    "expires_at",
    "kid",
    "request_id",
    "latency_ms",
    "policies",
)


@dataclass(frozen=True)
class AuditFilter:
    since: float | None = None
    until: float | None = None
    client_id: str | None = None
    subject: str | None = None
    audience: str | None = None
    decision: str | None = None  # granted | denied | a change (sidecar.store.changes)
    kind: str | None = None  # exchange | change
    jti: str | None = None
    kid: str | None = None
    limit: int = 100


def search(engine: Engine, where: AuditFilter) -> list[dict[str, Any]]:
    """Matching decisions, newest first, at most ``where.limit``."""
    query = select(AuditEventRow)
    if where.since is not None:
        query = query.where(AuditEventRow.at >= where.since)
    if where.until is not None:
        query = query.where(AuditEventRow.at < where.until)
    if where.client_id is not None:
        query = query.where(AuditEventRow.client_id == where.client_id)
    if where.subject is not None:
        query = query.where(AuditEventRow.subject == where.subject)
    if where.decision is not None:
        query = query.where(AuditEventRow.decision == where.decision)
    if where.kind == "exchange":
        query = query.where(AuditEventRow.decision.in_(EXCHANGES))
    elif where.kind == "change":
        query = query.where(AuditEventRow.decision.in_(CHANGES))
    if where.jti is not None:
        query = query.where(AuditEventRow.jti == where.jti)
    if where.kid is not None:
        query = query.where(AuditEventRow.kid == where.kid)
    if where.audience is not None:
        # The audiences column is a JSON list: narrowed by text here, matched exactly below.
        query = query.where(AuditEventRow.audiences.contains(json.dumps(where.audience)[1:-1]))
    query = query.order_by(AuditEventRow.at.desc(), AuditEventRow.id.desc())
    found: list[dict[str, Any]] = []
    with engine.connect() as connection:
        for row in connection.execute(query.limit(where.limit if where.audience is None else None)):
            record = {name: getattr(row, name) for name in COLUMNS}
            record["audiences"] = json.loads(record["audiences"] or "[]")
            if where.audience is not None and where.audience not in record["audiences"]:
                continue
            found.append(record)
            if len(found) >= where.limit:
                break
    return found
