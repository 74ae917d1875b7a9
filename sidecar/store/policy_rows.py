"""Policies to rows and back, for the policy store: the :class:`~sidecar.exchange.policy.Policy`
a ``policies`` row holds and writing one into a row, the :class:`StoredPolicy` the store returns
for a row, and a ``policy_versions`` history row and its :class:`PolicyVersion`. The JSON
columns (scopes, claims, conditions, documents) are encoded and decoded here only."""

from __future__ import annotations

import json

from sidecar.exchange.policy import Condition, Policy
from sidecar.store.models import PolicyRow, PolicyVersionRow
from sidecar.store.policy_documents import PolicyVersion, StoredPolicy, policy_document

__all__ = [
    "history_row",
    "policy_from_row",
    "policy_version",
    "stored_policy",
    "write_policy_row",
]


def policy_from_row(row: PolicyRow) -> Policy:
    return Policy(
        name=row.name,
        client_id=row.client_id,
        audience=row.audience,
        scopes=frozenset(json.loads(row.scopes)),
        default_scopes=frozenset(json.loads(row.default_scopes)),
        ttl=row.ttl,
        enabled=row.enabled,
        require_subject_scopes=row.require_subject_scopes,
        reuse_tokens=row.reuse_tokens,
        copy_claims=tuple(json.loads(row.copy_claims)),
        credential=row.credential,
        upstream=row.upstream,
        issuer=row.issuer,
        conditions=tuple(
            Condition(c["claim"], c["operator"], tuple(c["values"]))
            for c in json.loads(row.conditions)
        ),
    )


def write_policy_row(row: PolicyRow, policy: Policy) -> None:
    row.name = policy.name
    row.client_id = policy.client_id
    row.audience = policy.audience
    row.issuer = policy.issuer
    row.conditions = json.dumps(
        [
            {"claim": c.claim, "operator": c.operator, "values": list(c.values)}
            for c in policy.conditions
        ]
    )
    row.scopes = json.dumps(sorted(policy.scopes))
    row.default_scopes = json.dumps(sorted(policy.default_scopes))
    row.ttl = policy.ttl
    row.enabled = policy.enabled
    row.require_subject_scopes = policy.require_subject_scopes
    row.reuse_tokens = policy.reuse_tokens
    row.copy_claims = json.dumps(list(policy.copy_claims))
    row.credential = policy.credential
    row.upstream = policy.upstream


def stored_policy(row: PolicyRow) -> StoredPolicy:
    return StoredPolicy(policy_from_row(row), row.version, row.updated_at, row.updated_by)


def policy_version(row: PolicyVersionRow) -> PolicyVersion:
    return PolicyVersion(
        name=row.name,
        version=row.version,
        action=row.action,
        document=json.loads(row.document),
        changed_at=row.changed_at,
        changed_by=row.changed_by,
    )


def history_row(
    policy: Policy, version: int, action: str, *, changed_at: float, changed_by: str
) -> PolicyVersionRow:
    """The ``policy_versions`` row recording ``policy`` as ``version`` (its whole document)."""
    return PolicyVersionRow(
        name=policy.name,
        client_id=policy.client_id,
        audience=policy.audience,
        version=version,
        action=action,
        document=json.dumps(policy_document(policy)),
        changed_at=changed_at,
        changed_by=changed_by,
    )
