"""The policy table: loading the policy set, and declarative apply with a version history."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from sidecar.config import PolicyConfig
from sidecar.exchange.policy import Policy, PolicySet
from sidecar.store.db import hold_lease
from sidecar.store.models import PolicyRow, PolicyVersionRow


def policy_from_config(config: PolicyConfig) -> Policy:
    return Policy(
        client_id=config.client_id,
        audience=config.audience,
        scopes=frozenset(config.scopes),
        default_scopes=frozenset(config.default_scopes),
        ttl=config.ttl,
        enabled=config.enabled,
        require_subject_scopes=config.require_subject_scopes,
        copy_claims=tuple(config.copy_claims),
    )


def policy_document(policy: Policy) -> dict[str, Any]:
    """The policy as it is written in a YAML file (sorted lists, every field)."""
    return {
        "client_id": policy.client_id,
        "audience": policy.audience,
        "scopes": sorted(policy.scopes),
        "default_scopes": sorted(policy.default_scopes),
        "ttl": policy.ttl,
        "enabled": policy.enabled,
        "require_subject_scopes": policy.require_subject_scopes,
        "copy_claims": list(policy.copy_claims),
    }


def _from_row(row: PolicyRow) -> Policy:
    return Policy(
        client_id=row.client_id,
        audience=row.audience,
        scopes=frozenset(json.loads(row.scopes)),
        default_scopes=frozenset(json.loads(row.default_scopes)),
        ttl=row.ttl,
        enabled=row.enabled,
        require_subject_scopes=row.require_subject_scopes,
        copy_claims=tuple(json.loads(row.copy_claims)),
    )


def _write_row(row: PolicyRow, policy: Policy) -> None:
    document = policy_document(policy)
    row.client_id = policy.client_id
    row.audience = policy.audience
    row.scopes = json.dumps(document["scopes"])
    row.default_scopes = json.dumps(document["default_scopes"])
    row.ttl = policy.ttl
    row.enabled = policy.enabled
    row.require_subject_scopes = policy.require_subject_scopes
    row.copy_claims = json.dumps(document["copy_claims"])


@dataclass
class PolicyChanges:
    created: list[Policy] = field(default_factory=list)
    updated: list[tuple[Policy, Policy]] = field(default_factory=list)  # (before, after)
    deleted: list[Policy] = field(default_factory=list)
    unchanged: list[Policy] = field(default_factory=list)

    @property
    def any(self) -> bool:
        return bool(self.created or self.updated or self.deleted)


class PolicyStore:
    def __init__(self, sessions: sessionmaker[Session], clock: Callable[[], float]) -> None:
        self._sessions = sessions
        self._clock = clock

    def load(self) -> PolicySet:
        with self._sessions() as session:
            return PolicySet(_from_row(row) for row in session.scalars(select(PolicyRow)))

    def count(self) -> int:
        return len(self.load())

    def apply(
        self,
        policies: list[PolicyConfig],
        *,
        actor: str,
        dry_run: bool = False,
        prune: bool = False,
    ) -> PolicyChanges:
        """Make the table match ``policies`` in one transaction (nothing changes on error or
        with ``dry_run``); with ``prune``, policies absent from the list are deleted."""
        wanted = {(p.client_id, p.audience): policy_from_config(p) for p in policies}
        changes = PolicyChanges()
        with self._sessions() as session, session.begin():
            if not dry_run:
                hold_lease(session, "policies")
            rows = {(r.client_id, r.audience): r for r in session.scalars(select(PolicyRow))}
            now = self._clock()
            for key, policy in wanted.items():
                row = rows.get(key)
                if row is None:
                    changes.created.append(policy)
                    if not dry_run:
                        row = PolicyRow(version=1, updated_at=now, updated_by=actor)
                        _write_row(row, policy)
                        session.add(row)
                        self._record(session, policy, 1, "create", now, actor)
                    continue
                before = _from_row(row)
                if before == policy:
                    changes.unchanged.append(policy)
                    continue
                changes.updated.append((before, policy))
                if not dry_run:
                    _write_row(row, policy)
                    row.version += 1
                    row.updated_at, row.updated_by = now, actor
                    self._record(session, policy, row.version, "update", now, actor)
            if prune:
                for key, row in rows.items():
                    if key not in wanted:
                        policy = _from_row(row)
                        changes.deleted.append(policy)
                        if not dry_run:
                            self._record(session, policy, row.version + 1, "delete", now, actor)
                            session.delete(row)
            if dry_run:
                session.rollback()
        return changes

    @staticmethod
    def _record(
        session: Session, policy: Policy, version: int, action: str, now: float, actor: str
    ) -> None:
        session.add(
            PolicyVersionRow(
                client_id=policy.client_id,
                audience=policy.audience,
                version=version,
                action=action,
                document=json.dumps(policy_document(policy)),
                changed_at=now,
                changed_by=actor,
            )
        )
