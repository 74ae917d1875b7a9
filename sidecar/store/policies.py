"""The policy table: the policy set the service decides with, declarative apply, single-policy
writes with optimistic concurrency (the admin API and the single-policy commands: enable, disable,
delete), and a version history with rollback and version-to-version diffs.

Every write happens in one transaction under the ``policies`` lease, validates the *resulting*
whole set (overlaps, unknown clients, ttl) before commit, and records one ``policy_versions`` row
per changed policy with who made the change. A refused write changes nothing. On PostgreSQL a
write that changes something also notifies every worker on commit (:mod:`sidecar.store.notify`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from sidecar.config import PolicyConfig
from sidecar.exchange.policy import Policy, PolicySet
from sidecar.store.changes import record_policy_change
from sidecar.store.db import hold_lease
from sidecar.store.models import PolicyRow, PolicyVersionRow
from sidecar.store.notify import POLICIES, notify_change
from sidecar.store.policy_documents import (
    DOCUMENT_FIELDS,
    FieldChange,
    PolicyChanges,
    PolicyError,
    PolicyExists,
    PolicyInvalid,
    PolicyNotFound,
    PolicyVersion,
    StaleVersion,
    StoredPolicy,
    VersionNotFound,
    document_changes,
    policy_document,
    policy_file_text,
    policy_from_document,
)
from sidecar.store.policy_rows import (
    history_row,
    policy_from_row,
    policy_version,
    stored_policy,
    write_policy_row,
)

__all__ = [
    "DOCUMENT_FIELDS",
    "FieldChange",
    "PolicyChanges",
    "PolicyError",
    "PolicyExists",
    "PolicyInvalid",
    "PolicyNotFound",
    "PolicyStore",
    "PolicyVersion",
    "SetValidator",
    "StaleVersion",
    "StoredPolicy",
    "VersionNotFound",
    "document_changes",
    "policy_document",
    "policy_file_text",
    "policy_from_document",
]

# Validates a whole policy set; raises ValueError naming the offending policy.
SetValidator = Callable[[list[Policy]], None]


class PolicyStore:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        clock: Callable[[], float],
        validate: SetValidator | None = None,
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._validate = validate
        # What the last load() returned, by name: (version, policy object).
        self._loaded: dict[str, tuple[int, Policy]] = {}

    # --- reading --------------------------------------------------------------------------------

    def load(self) -> PolicySet:
        """The policy set. A policy whose stored version is the one the previous load saw is
        the very object that load returned; any other version is a new object. The minted-token
        cache relies on it: identity is "the same version", which equal values are not (a policy
        disabled then enabled again is equal to what it was)."""
        with self._sessions() as session:
            marker = self._marker(session)
            rows = [
                (row.version, policy_from_row(row)) for row in session.scalars(select(PolicyRow))
            ]
        previous, loaded = self._loaded, {}
        for version, policy in rows:
            known = previous.get(policy.name)
            if known is not None and known[0] == version and known[1] == policy:
                policy = known[1]
            loaded[policy.name] = (version, policy)
        self._loaded = loaded
        policies = PolicySet(policy for _, policy in loaded.values())
        policies.marker = marker
        policies.versions = {name: version for name, (version, _) in loaded.items()}
        return policies

    def load_if_changed(self, previous: PolicySet | None) -> PolicySet:
        """``previous`` itself when the table has not changed since it was loaded (one small
        query instead of reading and indexing every policy on each refresh), else a new set."""
        if previous is not None and previous.marker is not None:
            with self._sessions() as session:
                if self._marker(session) == previous.marker:
                    return previous
        return self.load()

    @staticmethod
    def _marker(session: Session) -> tuple[Any, ...]:
        # Every change writes a policy_versions row (autoincrement id); the count, versions and
        # timestamps of the table also catch a row changed without one.
        row = session.execute(
            select(
                select(func.max(PolicyVersionRow.id)).scalar_subquery(),
                func.count(PolicyRow.id),
                func.sum(PolicyRow.version),
                func.max(PolicyRow.updated_at),
            )
        ).one()
        return tuple(row)

    def all(self) -> list[StoredPolicy]:
        with self._sessions() as session:
            rows = session.scalars(select(PolicyRow).order_by(PolicyRow.name)).all()
            return [stored_policy(row) for row in rows]

    def get(self, name: str) -> StoredPolicy | None:
        with self._sessions() as session:
            row = session.scalars(select(PolicyRow).where(PolicyRow.name == name)).first()
            return stored_policy(row) if row is not None else None

    def history(self, name: str) -> list[PolicyVersion]:
        with self._sessions() as session:
            rows = session.scalars(
                select(PolicyVersionRow)
                .where(PolicyVersionRow.name == name)
                .order_by(PolicyVersionRow.version, PolicyVersionRow.id)
            ).all()
            return [policy_version(row) for row in rows]

    def diff(self, name: str, from_version: int, to_version: int) -> list[FieldChange]:
        """The fields that differ between two versions of policy ``name``, as its history
        recorded them (a deletion's version holds the policy as it was deleted)."""
        documents = {v.version: v.document for v in self.history(name)}
        if not documents:
            raise PolicyNotFound(f"no policy {name}")
        for version in (from_version, to_version):
            if version not in documents:
                raise VersionNotFound(f"policy {name} has no version {version}")
        return document_changes(documents[from_version], documents[to_version])

    # --- writing --------------------------------------------------------------------------------

    def apply(
        self,
        policies: Sequence[PolicyConfig | Policy],
        *,
        actor: str,
        dry_run: bool = False,
        prune: bool = False,
    ) -> PolicyChanges:
        """Make the table match ``policies`` (by name) in one transaction; with ``prune``,
        policies absent from the list are deleted; ``dry_run`` computes the changes only."""
        built = [p.to_policy() if isinstance(p, PolicyConfig) else p for p in policies]
        wanted = {policy.name: policy for policy in built}
        if len(wanted) != len(built):
            raise PolicyInvalid("two policies have the same name")
        changes = PolicyChanges()
        with self._sessions() as session, session.begin():
            hold_lease(session, "policies")
            rows = {row.name: row for row in session.scalars(select(PolicyRow))}
            heads = self._heads(session, [*wanted, *rows])
            for name, policy in wanted.items():
                row = rows.get(name)
                if row is None:
                    changes.created.append(policy)
                    self._create(session, policy, actor)
                    continue
                before = policy_from_row(row)
                if before == policy:
                    changes.unchanged.append(policy)
                    continue
                changes.updated.append((before, policy))
                self._update(session, row, policy, actor, "update")
            if prune:
                for name, row in rows.items():
                    if name not in wanted:
                        changes.deleted.append(policy_from_row(row))
                        self._delete(session, row, actor)
            changed = [*changes.created, *(after for _, after in changes.updated), *changes.deleted]
            changes.previous = {p.name: heads[p.name] for p in changed if p.name in heads}
            self._check(session)
            if dry_run:
                session.rollback()
            elif changes.any:
                notify_change(session, POLICIES)
        return changes

    def put(
        self, policy: Policy, *, actor: str, if_version: int | None, create: bool
    ) -> StoredPolicy:
        """Create (``create``) or update one policy. An update must name the version it read
        (``if_version``); a stale one raises :class:`StaleVersion`."""
        with self._sessions() as session, session.begin():
            hold_lease(session, "policies")
            row = session.scalars(select(PolicyRow).where(PolicyRow.name == policy.name)).first()
            if create:
                if row is not None:
                    raise PolicyExists(f"policy {policy.name} exists")
                row = self._create(session, policy, actor)
            else:
                if row is None:
                    raise PolicyNotFound(f"no policy {policy.name}")
                if if_version is None or row.version != if_version:
                    raise StaleVersion(policy.name, row.version)
                if policy_from_row(row) == policy:
                    self._check(session)
                    return stored_policy(row)
                self._update(session, row, policy, actor, "update")
            self._check(session)
            notify_change(session, POLICIES)
            return stored_policy(row)

    def set_enabled(
        self, name: str, enabled: bool, *, actor: str, if_version: int | None = None
    ) -> StoredPolicy:
        """Enable or disable policy ``name``, recorded as action ``enable`` / ``disable``; no new
        version when it already is. With ``if_version``, only while that is its version (else
        :class:`StaleVersion`). Enabling is checked against the whole set like any write."""
        with self._sessions() as session, session.begin():
            hold_lease(session, "policies")
            row = self._current(session, name, if_version)
            if row.enabled == enabled:
                return stored_policy(row)
            policy = dataclasses.replace(policy_from_row(row), enabled=enabled)
            self._update(session, row, policy, actor, "enable" if enabled else "disable")
            self._check(session)
            notify_change(session, POLICIES)
            return stored_policy(row)

    def delete(self, name: str, *, actor: str, if_version: int | None = None) -> int:
        """Delete policy ``name``, recorded as action ``delete`` (its history stays, so it can
        be rolled back); the version that records the deletion. With ``if_version``, only
        while that is its version (else :class:`StaleVersion`)."""
        with self._sessions() as session, session.begin():
            hold_lease(session, "policies")
            row = self._current(session, name, if_version)
            version = self._delete(session, row, actor)
            self._check(session)
            notify_change(session, POLICIES)
            return version

    def rollback(
        self, name: str, version: int, *, actor: str, if_version: int | None = None
    ) -> StoredPolicy:
        """Restore the policy as it was at ``version``, as a new version. With ``if_version``,
        only while that is its newest version (for a deleted policy, its deletion's)."""
        with self._sessions() as session, session.begin():
            hold_lease(session, "policies")
            newest = self._next_version(session, name) - 1
            if newest == 0:
                raise PolicyNotFound(f"no policy {name}")
            if if_version is not None and if_version != newest:
                raise StaleVersion(name, newest)
            target = session.scalars(
                select(PolicyVersionRow).where(
                    PolicyVersionRow.name == name, PolicyVersionRow.version == version
                )
            ).first()
            if target is None:
                raise VersionNotFound(f"policy {name} has no version {version}")
            if target.action == "delete":
                raise PolicyInvalid(f"version {version} of policy {name} is its deletion")
            policy = policy_from_document(json.loads(target.document))
            row = session.scalars(select(PolicyRow).where(PolicyRow.name == name)).first()
            if row is None:
                row = self._create(session, policy, actor, action="rollback")
            else:
                self._update(session, row, policy, actor, "rollback")
            self._check(session)
            notify_change(session, POLICIES)
            return stored_policy(row)

    # --- internals ------------------------------------------------------------------------------

    def _check(self, session: Session) -> None:
        session.flush()
        if self._validate is None:
            return
        resulting = [policy_from_row(row) for row in session.scalars(select(PolicyRow))]
        try:
            self._validate(resulting)
        except ValueError as exc:
            raise PolicyInvalid(str(exc)) from None

    @staticmethod
    def _current(session: Session, name: str, if_version: int | None) -> PolicyRow:
        """The row of policy ``name``, at version ``if_version`` when one is given."""
        row = session.scalars(select(PolicyRow).where(PolicyRow.name == name)).first()
        if row is None:
            raise PolicyNotFound(f"no policy {name}")
        if if_version is not None and row.version != if_version:
            raise StaleVersion(name, row.version)
        return row

    @staticmethod
    def _heads(session: Session, names: Sequence[str]) -> dict[str, PolicyVersion]:
        """The newest history version of each of ``names`` that has one: the row each name
        wrote last (versions and ids grow together), without reading whole histories."""
        if not names:
            return {}
        newest = (
            select(func.max(PolicyVersionRow.id))
            .where(PolicyVersionRow.name.in_(set(names)))
            .group_by(PolicyVersionRow.name)
        )
        rows = session.scalars(select(PolicyVersionRow).where(PolicyVersionRow.id.in_(newest)))
        return {row.name: policy_version(row) for row in rows}

    def _next_version(self, session: Session, name: str) -> int:
        versions = session.scalars(
            select(PolicyVersionRow.version).where(PolicyVersionRow.name == name)
        ).all()
        return max(versions, default=0) + 1

    def _create(
        self, session: Session, policy: Policy, actor: str, action: str = "create"
    ) -> PolicyRow:
        # A re-created policy continues its history's numbering.
        version = self._next_version(session, policy.name)
        row = PolicyRow(version=version, updated_at=self._clock(), updated_by=actor)
        write_policy_row(row, policy)
        session.add(row)
        self._record(session, policy, version, action, actor)
        return row

    def _update(
        self, session: Session, row: PolicyRow, policy: Policy, actor: str, action: str
    ) -> None:
        before = policy_from_row(row)
        write_policy_row(row, policy)
        row.version = self._next_version(session, policy.name)
        row.updated_at, row.updated_by = self._clock(), actor
        self._record(session, policy, row.version, action, actor, before)

    def _delete(self, session: Session, row: PolicyRow, actor: str) -> int:
        policy = policy_from_row(row)
        version = self._next_version(session, policy.name)
        self._record(session, policy, version, "delete", actor)
        session.delete(row)
        return version

    def _record(
        self,
        session: Session,
        policy: Policy,
        version: int,
        action: str,
        actor: str,
        before: Policy | None = None,
    ) -> None:
        """The history row, and the change's row in the audit trail (same transaction)."""
        now = self._clock()
        session.add(history_row(policy, version, action, changed_at=now, changed_by=actor))
        reason = None
        if before is not None and before.enabled != policy.enabled:
            reason = "enabled" if policy.enabled else "disabled"
        record_policy_change(
            session,
            at=now,
            action=action,
            actor=actor,
            name=policy.name,
            version=version,
            client_id=policy.client_id,
            audience=policy.audience,
            reason=reason,
        )
