"""Policies as documents, with no database: the documents a policy file, the admin API and
the history hold (``policy_document``, ``policy_from_document``, ``policy_file_text``), the
differences between two (``document_changes``), and the values and errors the policy store
returns. Apart from :mod:`sidecar.store.policies` so that the command line can show policies
without loading the database layer until a command needs it."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError

from sidecar.config import PolicyConfig, format_validation_error
from sidecar.exchange.policy import Policy


class PolicyError(Exception):
    """A policy write that cannot be made; the message says why."""


class PolicyInvalid(PolicyError):
    pass


class PolicyNotFound(PolicyError):
    pass


class VersionNotFound(PolicyNotFound):
    """The policy's history has no such version."""


class PolicyExists(PolicyError):
    pass


class StaleVersion(PolicyError):
    """The policy changed since the version the writer read (optimistic concurrency)."""

    def __init__(self, name: str, current: int) -> None:
        super().__init__(f"policy {name} is at version {current}")
        self.current = current


def policy_document(policy: Policy) -> dict[str, Any]:
    """The policy as it is written in a policy file (every field, sorted lists)."""
    document: dict[str, Any] = {
        "name": policy.name,
        "client_id": policy.client_id,
        "audience": policy.audience,
    }
    if policy.issuer is not None:
        document["issuer"] = policy.issuer
    if policy.conditions:
        document["subject"] = {
            c.claim: {c.operator: list(c.values) if c.operator == "one_of" else c.values[0]}
            for c in policy.conditions
        }
    document.update(
        scopes=sorted(policy.scopes),
        default_scopes=sorted(policy.default_scopes),
        ttl=policy.ttl,
        enabled=policy.enabled,
        require_subject_scopes=policy.require_subject_scopes,
        reuse_tokens=policy.reuse_tokens,
        copy_claims=list(policy.copy_claims),
    )
    if policy.credential != "mint":
        document.update(credential=policy.credential, upstream=policy.upstream)
    return document


def policy_file_text(policies: Iterable[Policy]) -> str:
    """A policy file (YAML) holding ``policies`` sorted by name, every field, no versions:
    ``sidecar policy apply`` takes it as it is. Every ``${`` is written ``$${``, since a policy
    file's strings are read with ``${NAME}`` substitution."""

    def literal(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: literal(item) for key, item in value.items()}
        if isinstance(value, list):
            return [literal(item) for item in value]
        return value.replace("${", "$${") if isinstance(value, str) else value

    documents = [policy_document(p) for p in sorted(policies, key=lambda p: p.name)]
    # A wide line: a long audience or name stays on one line, as a person would write it.
    return yaml.safe_dump(
        {"policies": literal(documents)}, sort_keys=False, allow_unicode=True, width=4096
    )


def policy_from_document(document: Any, *, strict: bool = False) -> Policy:
    """Parse a policy document (a policy file entry, an admin API body, a history version);
    ``strict`` refuses any type coercion (JSON from the admin API: "60" is not a ttl)."""
    try:
        return PolicyConfig.model_validate(document, strict=strict).to_policy()
    except ValidationError as exc:
        raise PolicyInvalid("; ".join(format_validation_error(exc).splitlines())) from None


@dataclass(frozen=True, slots=True)
class StoredPolicy:
    policy: Policy
    version: int
    updated_at: float
    updated_by: str


@dataclass(frozen=True, slots=True)
class PolicyVersion:
    name: str
    version: int
    action: str
    document: dict[str, Any]
    changed_at: float
    changed_by: str


@dataclass(frozen=True, slots=True)
class FieldChange:
    """One field of a policy document that differs between two versions; ``None`` where the
    field is absent (an optional field such as ``issuer`` or ``subject``)."""

    key: str
    before: Any
    after: Any

    def as_dict(self) -> dict[str, Any]:
        return {"field": self.key, "before": self.before, "after": self.after}


# The fields of a policy document in the order policy_document() writes them.
DOCUMENT_FIELDS = (
    "name", "client_id", "audience", "issuer", "subject", "scopes", "default_scopes", "ttl",
    "enabled", "require_subject_scopes", "reuse_tokens", "copy_claims", "credential", "upstream",
)  # fmt: skip


def document_changes(before: dict[str, Any], after: dict[str, Any]) -> list[FieldChange]:
    """The fields that differ between two policy documents, in document order (a field that
    only an older document knows last). Compared as JSON: ``true`` and ``1`` differ, as they do
    when a condition matches (Python's True == 1)."""

    def written(document: dict[str, Any], key: str) -> str:
        return json.dumps(document.get(key), sort_keys=True)

    def place(key: str) -> int:
        return DOCUMENT_FIELDS.index(key) if key in DOCUMENT_FIELDS else len(DOCUMENT_FIELDS)

    keys = sorted(dict.fromkeys([*before, *after]), key=place)
    return [
        FieldChange(key, before.get(key), after.get(key))
        for key in keys
        if written(before, key) != written(after, key)
    ]


@dataclass
class PolicyChanges:
    created: list[Policy] = field(default_factory=list)
    updated: list[tuple[Policy, Policy]] = field(default_factory=list)  # (before, after)
    deleted: list[Policy] = field(default_factory=list)
    unchanged: list[Policy] = field(default_factory=list)
    # The newest history version of each created, updated or deleted name, as it was before
    # this change (read in the same transaction): what the change replaces, and who made it.
    previous: dict[str, PolicyVersion] = field(default_factory=dict)

    @property
    def any(self) -> bool:
        return bool(self.created or self.updated or self.deleted)
