"""Policy and key changes in the audit trail, beside the exchanges they govern.

Each change is one ``audit_events`` row added in the *same transaction* as the change itself:
a change that commits is recorded, a refused or rolled-back one (``policy apply --dry-run``)
leaves no record. ``decision`` names the change (``policy_update``, ``key_rotate``, ...),
``actor`` who made it, and ``policies`` / ``kid`` what it touched."""

from __future__ import annotations

import json

from sqlalchemy.orm import Session

from sidecar.store.actions import CHANGES, KEY_ACTIONS, POLICY_ACTIONS, SERVICE
from sidecar.store.models import AuditEventRow

__all__ = ["CHANGES", "SERVICE", "record_key_change", "record_policy_change"]


def record_policy_change(
    session: Session,
    *,
    at: float,
    action: str,
    actor: str,
    name: str,
    version: int,
    client_id: str,
    audience: str,
    reason: str | None = None,
) -> None:
    session.add(
        AuditEventRow(
            at=at,
            decision=_change("policy", action, POLICY_ACTIONS),
            actor=actor[:255],
            client_id=client_id,
            audiences=json.dumps([audience]),
            policies=f"{name}@{version}",
            reason=reason,
        )
    )


def record_key_change(
    session: Session, *, at: float, action: str, kid: str, actor: str = SERVICE
) -> None:
    session.add(
        AuditEventRow(
            at=at, decision=_change("key", action, KEY_ACTIONS), actor=actor[:255], kid=kid
        )
    )


def _change(kind: str, action: str, known: tuple[str, ...]) -> str:
    if action not in known:
        raise ValueError(f"unknown {kind} change {action!r}")
    return f"{kind}_{action}"
