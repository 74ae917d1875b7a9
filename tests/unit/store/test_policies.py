"""The policy table: declarative apply (create, update, unchanged, prune, dry run), atomicity,
and the version history."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from sidecar.config import PolicyConfig
from sidecar.store.models import PolicyVersionRow
from sidecar.store.policies import PolicyStore
from tests.conftest import CODE_SEARCH, DISABLED, TICKETS, FakeClock
from tests.unit.store.tables import snapshot
from tests.unit.support import gateway_policy_config


def policy(audience: str, **overrides: Any) -> PolicyConfig:
    return gateway_policy_config(audience, **overrides)


def versions(engine: Engine) -> list[tuple[str, int, str, str]]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(
                PolicyVersionRow.audience,
                PolicyVersionRow.version,
                PolicyVersionRow.action,
                PolicyVersionRow.changed_by,
            ).order_by(PolicyVersionRow.id)
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


@pytest.fixture
def store(sessions: sessionmaker[Session], clock: FakeClock) -> PolicyStore:
    return PolicyStore(sessions, clock)


def test_apply_creates_policies(store: PolicyStore) -> None:
    changes = store.apply([policy(CODE_SEARCH), policy(TICKETS, ttl=60)], actor="alice")

    assert [p.audience for p in changes.created] == [CODE_SEARCH, TICKETS]
    assert changes.updated == []
    assert changes.deleted == []
    assert changes.unchanged == []
    loaded = store.load()
    assert len(loaded) == 2
    assert len(store.all()) == 2


def test_loaded_policy_round_trips_every_field(store: PolicyStore) -> None:
    wanted = policy(
        CODE_SEARCH,
        enabled=False,
        require_subject_scopes=True,
        reuse_tokens=False,
        copy_claims=["email", "groups"],
    )
    store.apply([wanted], actor="alice")

    [loaded] = list(store.load())

    assert loaded.client_id == "gateway"
    assert loaded.audience == CODE_SEARCH
    assert loaded.scopes == frozenset({"code.read", "code.search"})
    assert loaded.default_scopes == frozenset({"code.read"})
    assert loaded.ttl == 120
    assert loaded.enabled is False
    assert loaded.require_subject_scopes is True
    assert loaded.reuse_tokens is False
    assert loaded.copy_claims == ("email", "groups")


def test_reuse_tokens_defaults_to_true_and_a_change_of_it_is_an_update(store: PolicyStore) -> None:
    store.apply([policy(CODE_SEARCH)], actor="alice")
    [loaded] = list(store.load())
    assert loaded.reuse_tokens is True

    changes = store.apply([policy(CODE_SEARCH, reuse_tokens=False)], actor="bob")

    [(before, after)] = changes.updated
    assert (before.reuse_tokens, after.reuse_tokens) == (True, False)
    [loaded] = list(store.load())
    assert loaded.reuse_tokens is False
    assert [v.document["reuse_tokens"] for v in store.history(loaded.name)] == [True, False]


def test_apply_updates_a_changed_policy(store: PolicyStore) -> None:
    store.apply([policy(CODE_SEARCH)], actor="alice")

    changes = store.apply([policy(CODE_SEARCH, ttl=30)], actor="bob")

    [(before, after)] = changes.updated
    assert (before.ttl, after.ttl) == (120, 30)
    assert not changes.created
    [loaded] = list(store.load())
    assert loaded.ttl == 30


def test_apply_of_the_same_policies_changes_nothing(store: PolicyStore, engine: Engine) -> None:
    store.apply([policy(CODE_SEARCH), policy(TICKETS)], actor="alice")
    before = snapshot(engine)

    changes = store.apply([policy(TICKETS), policy(CODE_SEARCH)], actor="bob")

    assert not changes.any
    assert len(changes.unchanged) == 2
    assert versions(engine) == [
        (CODE_SEARCH, 1, "create", "alice"),
        (TICKETS, 1, "create", "alice"),
    ]
    assert snapshot(engine)["policies"] == before["policies"]


def test_scope_order_is_not_a_change(store: PolicyStore) -> None:
    store.apply([policy(CODE_SEARCH)], actor="alice")

    changes = store.apply([policy(CODE_SEARCH, scopes=["code.search", "code.read"])], actor="alice")

    assert not changes.any


def test_apply_without_prune_keeps_policies_missing_from_the_list(store: PolicyStore) -> None:
    store.apply([policy(CODE_SEARCH), policy(TICKETS)], actor="alice")

    changes = store.apply([policy(CODE_SEARCH)], actor="alice")

    assert not changes.deleted
    assert len(store.load()) == 2


def test_apply_with_prune_deletes_policies_missing_from_the_list(
    store: PolicyStore, engine: Engine
) -> None:
    store.apply([policy(CODE_SEARCH), policy(TICKETS)], actor="alice")

    changes = store.apply([policy(CODE_SEARCH)], actor="bob", prune=True)

    assert [p.audience for p in changes.deleted] == [TICKETS]
    assert [p.audience for p in store.load()] == [CODE_SEARCH]
    assert versions(engine)[-1] == (TICKETS, 2, "delete", "bob")


def test_dry_run_reports_changes_and_changes_nothing(store: PolicyStore, engine: Engine) -> None:
    store.apply([policy(CODE_SEARCH), policy(TICKETS)], actor="alice")
    before = snapshot(engine)

    changes = store.apply(
        [policy(CODE_SEARCH, ttl=30), policy(DISABLED)], actor="bob", dry_run=True, prune=True
    )

    assert [p.audience for p in changes.created] == [DISABLED]
    assert [after.ttl for _, after in changes.updated] == [30]
    assert [p.audience for p in changes.deleted] == [TICKETS]
    assert snapshot(engine) == before


def test_failed_apply_leaves_the_tables_exactly_as_they_were(
    store: PolicyStore, engine: Engine
) -> None:
    store.apply([policy(CODE_SEARCH), policy(TICKETS)], actor="alice")
    before = snapshot(engine)

    # The last policy holds a ttl no INTEGER column can store: the database refuses the write
    # after the update and the creation before it were sent in the same transaction.
    with pytest.raises((OverflowError, SQLAlchemyError)):
        store.apply(
            [policy(CODE_SEARCH, ttl=30), policy(DISABLED), policy("https://x", ttl=2**64)],
            actor="bob",
            prune=True,
        )

    assert snapshot(engine) == before
    assert [p.ttl for p in store.load() if p.audience == CODE_SEARCH] == [120]


def test_every_change_is_recorded_with_its_actor_and_document(
    store: PolicyStore, engine: Engine
) -> None:
    store.apply([policy(CODE_SEARCH)], actor="alice")
    store.apply([policy(CODE_SEARCH, ttl=30)], actor="bob")
    store.apply([policy(CODE_SEARCH, ttl=45)], actor="carol")
    store.apply([], actor="dave", prune=True)

    assert versions(engine) == [
        (CODE_SEARCH, 1, "create", "alice"),
        (CODE_SEARCH, 2, "update", "bob"),
        (CODE_SEARCH, 3, "update", "carol"),
        (CODE_SEARCH, 4, "delete", "dave"),
    ]
    with engine.connect() as connection:
        documents = connection.scalars(
            select(PolicyVersionRow.document).order_by(PolicyVersionRow.id)
        ).all()
    assert [json.loads(d)["ttl"] for d in documents] == [120, 30, 45, 45]


def test_version_and_author_are_kept_on_the_policy_row(
    store: PolicyStore, engine: Engine, clock: FakeClock
) -> None:
    store.apply([policy(CODE_SEARCH)], actor="alice")
    clock.advance(60)
    store.apply([policy(CODE_SEARCH, ttl=30)], actor="bob")

    with engine.connect() as connection:
        row = connection.execute(text("SELECT version, updated_by, updated_at FROM policies")).one()
    assert tuple(row) == (2, "bob", clock.now)


def test_load_if_changed_keeps_the_set_until_the_table_changes(store: PolicyStore) -> None:
    store.apply([policy(CODE_SEARCH), policy(TICKETS, ttl=60)], actor="alice")
    loaded = store.load()

    assert store.load_if_changed(loaded) is loaded  # no change: the same object
    assert store.load_if_changed(None) is not loaded

    store.apply([policy(CODE_SEARCH), policy(TICKETS, ttl=30)], actor="alice")  # an update
    updated = store.load_if_changed(loaded)
    assert updated is not loaded
    assert updated.find("gateway", TICKETS).ttl == 30  # type: ignore[union-attr]
    assert store.load_if_changed(updated) is updated

    store.apply([policy(CODE_SEARCH)], actor="alice", prune=True)  # a deletion
    pruned = store.load_if_changed(updated)
    assert len(pruned) == 1

    store.rollback(pruned_name := updated.find("gateway", TICKETS).name, 1, actor="bob")  # type: ignore[union-attr]
    restored = store.load_if_changed(pruned)
    assert [p.name for p in restored if p.name == pruned_name] == [pruned_name]
    assert restored.find("gateway", TICKETS).ttl == 60  # type: ignore[union-attr]


def test_a_policy_written_to_a_row_reads_back_the_same() -> None:
    from sidecar.store.models import PolicyRow
    from sidecar.store.policy_rows import policy_from_row, write_policy_row

    wanted = policy(
        CODE_SEARCH,
        enabled=False,
        require_subject_scopes=True,
        copy_claims=["email"],
        subject={"groups": {"contains": "eng"}, "mfa": {"equals": True}},
    ).to_policy()
    row = PolicyRow()

    write_policy_row(row, wanted)

    assert policy_from_row(row) == wanted
