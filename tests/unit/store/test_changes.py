"""Policy and key changes in the audit trail: one row per change, written in the change's own
transaction (a dry run or a refused write leaves none), naming who made it and what it touched."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from sidecar.store.audit_query import AuditFilter, search
from sidecar.store.changes import CHANGES, record_key_change
from sidecar.store.keys import KeyStore
from sidecar.store.models import AuditEventRow
from sidecar.store.policies import PolicyInvalid, PolicyStore
from tests.conftest import CODE_SEARCH, TICKETS, FakeClock
from tests.unit.store.test_keys import RETAIN_AFTER, keys_config
from tests.unit.support import gateway_policy_config


def changes(engine: Engine) -> list[dict[str, Any]]:
    found = search(engine, AuditFilter(kind="change", limit=1000))
    return list(reversed(found))  # oldest first


@pytest.fixture
def policies(sessions: sessionmaker[Session], clock: FakeClock) -> PolicyStore:
    return PolicyStore(sessions, clock)


@pytest.fixture
def keys(sessions: sessionmaker[Session], clock: FakeClock) -> KeyStore:
    return KeyStore(sessions, keys_config(), "ES256", clock)


def test_applied_policies_are_recorded_with_actor_version_client_and_audience(
    policies: PolicyStore, engine: Engine, clock: FakeClock
) -> None:
    policies.apply([gateway_policy_config(CODE_SEARCH)], actor="alice")

    [change] = changes(engine)
    name = policies.all()[0].policy.name
    assert change["decision"] == "policy_create"
    assert change["actor"] == "alice"
    assert change["policies"] == f"{name}@1"
    assert change["client_id"] == "gateway"
    assert change["audiences"] == [CODE_SEARCH]
    assert change["at"] == pytest.approx(clock.now)
    assert change["jti"] is None
    assert change["subject"] is None


def test_update_disable_and_delete_each_leave_their_row(
    policies: PolicyStore, engine: Engine
) -> None:
    policies.apply([gateway_policy_config(CODE_SEARCH)], actor="alice")
    policies.apply([gateway_policy_config(CODE_SEARCH, ttl=60)], actor="bob")
    policies.apply([gateway_policy_config(CODE_SEARCH, ttl=60, enabled=False)], actor="carol")
    policies.apply([gateway_policy_config(TICKETS)], actor="dave", prune=True)

    assert [(c["decision"], c["actor"], c["reason"]) for c in changes(engine)] == [
        ("policy_create", "alice", None),
        ("policy_update", "bob", None),
        ("policy_update", "carol", "disabled"),
        ("policy_create", "dave", None),
        ("policy_delete", "dave", None),
    ]


def test_rollback_is_recorded_as_such(policies: PolicyStore, engine: Engine) -> None:
    policies.apply([gateway_policy_config(CODE_SEARCH)], actor="alice")
    policies.apply([gateway_policy_config(CODE_SEARCH, ttl=60)], actor="bob")
    name = policies.all()[0].policy.name

    policies.rollback(name, 1, actor="carol")

    last = changes(engine)[-1]
    assert (last["decision"], last["actor"], last["policies"]) == (
        "policy_rollback",
        "carol",
        f"{name}@3",
    )


def test_a_dry_run_records_nothing(policies: PolicyStore, engine: Engine) -> None:
    policies.apply([gateway_policy_config(CODE_SEARCH)], actor="alice", dry_run=True)

    assert changes(engine) == []


def test_a_refused_write_records_nothing(policies: PolicyStore, engine: Engine) -> None:
    with pytest.raises(PolicyInvalid):
        policies.apply(
            [gateway_policy_config(CODE_SEARCH), gateway_policy_config(CODE_SEARCH)], actor="a"
        )

    assert changes(engine) == []


def test_key_generation_rotation_and_retirement_are_recorded(
    keys: KeyStore, engine: Engine
) -> None:
    keys.ensure_current()
    first = keys.load().keys[0].kid
    rotated = keys.rotate(immediate=True, actor="ops")
    keys.retire(first, actor="ops")

    assert [(c["decision"], c["kid"], c["actor"]) for c in changes(engine)] == [
        ("key_generate", first, "sidecar"),
        ("key_rotate", rotated.kid, "ops"),
        ("key_retire", first, "ops"),
    ]


def test_removing_keys_past_their_window_records_each(
    keys: KeyStore, engine: Engine, clock: FakeClock
) -> None:
    keys.ensure_current()
    first = keys.load().keys[0].kid
    keys.rotate(immediate=True)
    clock.advance(RETAIN_AFTER + 1)

    keys.maintain()

    assert ("key_remove", first) in [(c["decision"], c["kid"]) for c in changes(engine)]


def test_exchanges_and_changes_are_told_apart_by_kind(
    policies: PolicyStore, engine: Engine, clock: FakeClock
) -> None:
    policies.apply([gateway_policy_config(CODE_SEARCH)], actor="alice")
    with engine.begin() as connection:
        connection.execute(
            AuditEventRow.__table__.insert().values(
                at=clock.now, decision="granted", audiences=json.dumps([CODE_SEARCH])
            )
        )

    exchanges = search(engine, AuditFilter(kind="exchange"))
    everything = search(engine, AuditFilter())

    assert [e["decision"] for e in exchanges] == ["granted"]
    assert sorted(e["decision"] for e in everything) == ["granted", "policy_create"]


def test_every_change_name_fits_the_decision_column() -> None:
    width = AuditEventRow.__table__.c.decision.type.length
    assert all(len(name) <= width for name in CHANGES)


def test_an_unknown_change_is_refused(sessions: sessionmaker[Session]) -> None:
    with sessions() as session, pytest.raises(ValueError, match="unknown key change"):
        record_key_change(session, at=0.0, action="steal", kid="k")
    with sessions() as session:
        assert session.scalars(select(AuditEventRow)).all() == []
