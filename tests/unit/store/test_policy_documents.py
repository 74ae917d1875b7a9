"""Policies as documents (sidecar/store/policy_documents.py), with no database: a policy and its
document round-trip, a policy file re-reads as the same policies, and the field differences
between two documents are listed in document order, compared as JSON."""

from __future__ import annotations

import pytest
import yaml

from sidecar.exchange.policy import Condition
from sidecar.store.policy_documents import (
    PolicyInvalid,
    document_changes,
    policy_document,
    policy_file_text,
    policy_from_document,
)
from tests.conftest import CODE_SEARCH, TICKETS
from tests.unit.support import new_policy


def test_a_policy_and_its_document_round_trip() -> None:
    policy = new_policy(
        name="code",
        client_id="gateway",
        audience=CODE_SEARCH,
        scopes=["code.read", "code.search"],
        default_scopes=["code.read"],
        subject={"groups": {"contains": "eng"}, "mfa": {"equals": True}},
        copy_claims=["email"],
        ttl=90,
    )

    assert policy_from_document(policy_document(policy)) == policy


def test_an_upstream_credential_appears_in_the_document_only_when_not_minting() -> None:
    minting = new_policy(client_id="gateway", audience=CODE_SEARCH, scopes=["code.read"])
    static = new_policy(
        client_id="gateway",
        audience=TICKETS,
        scopes=["t.read"],
        credential="static",
        upstream="vendor",
    )

    assert "credential" not in policy_document(minting)
    assert (policy_document(static)["credential"], policy_document(static)["upstream"]) == (
        "static",
        "vendor",
    )


def test_a_strict_document_refuses_a_coerced_type() -> None:
    document = policy_document(
        new_policy(client_id="gateway", audience=CODE_SEARCH, scopes=["code.read"])
    )

    with pytest.raises(PolicyInvalid, match="ttl"):
        policy_from_document({**document, "ttl": "60"}, strict=True)
    assert policy_from_document({**document, "ttl": "60"}).ttl == 60


def test_a_policy_file_text_reads_back_as_the_same_policies() -> None:
    policies = [
        new_policy(name="b", client_id="gateway", audience=TICKETS, scopes=["t.read"]),
        new_policy(name="a", client_id="gateway", audience=CODE_SEARCH, scopes=["code.read"]),
    ]

    text = policy_file_text(policies)

    read = [policy_from_document(d) for d in yaml.safe_load(text)["policies"]]
    assert sorted(read, key=lambda p: p.name) == sorted(policies, key=lambda p: p.name)


def test_document_changes_lists_the_differing_fields_in_document_order() -> None:
    before = policy_document(
        new_policy(name="p", client_id="gateway", audience=CODE_SEARCH, scopes=["code.read"])
    )
    after = {**before, "ttl": 30, "scopes": ["code.read", "code.search"], "issuer": "https://i"}

    changes = document_changes(before, after)

    assert [(c.key, c.before, c.after) for c in changes] == [
        ("issuer", None, "https://i"),
        ("scopes", ["code.read"], ["code.read", "code.search"]),
        ("ttl", 120, 30),
    ]


def test_true_and_one_are_different_values() -> None:
    # As a condition tells them apart: Python's True == 1 must not hide a change.
    assert [c.key for c in document_changes({"x": True}, {"x": 1})] == ["x"]
    assert Condition("m", "equals", (True,)) != Condition("m", "equals", (1,))
