"""The policy table as a whole set (issue 5): names as keys, writes validated against the resulting
set (a refused write leaves every table exactly as it was), the version history with its actors,
rollback, and migration 0002 of a database holding 0001 data. SQLite and PostgreSQL."""

from __future__ import annotations

import json
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from sidecar.config import PolicyConfig, Settings, check_policy_set
from sidecar.exchange.policy import Condition, Policy
from sidecar.store import migrate
from sidecar.store.db import make_sessionmaker
from sidecar.store.policies import (
    PolicyInvalid,
    PolicyNotFound,
    PolicyStore,
    StaleVersion,
    VersionNotFound,
)
from tests.conftest import CODE_SEARCH, TICKETS, FakeClock
from tests.unit.store.tables import snapshot
from tests.unit.support import gateway_policy_config

IDP = "https://idp.test.example"  # the `idp` fixture's issuer, trusted by `settings`


def policy(name: str, audience: str = CODE_SEARCH, **overrides: Any) -> PolicyConfig:
    return gateway_policy_config(audience, name=name, **overrides)


def tenant(value: str) -> dict[str, Any]:
    return {"subject": {"tenant": {"equals": value}}}


@pytest.fixture
def store(sessions: sessionmaker[Session], clock: FakeClock, settings: Settings) -> PolicyStore:
    """The store as the service builds it: every write checked against the settings."""
    return PolicyStore(sessions, clock, validate=lambda ps: check_policy_set(ps, settings))


# --- names as keys --------------------------------------------------------------------------------


def test_two_exclusive_policies_for_one_target_are_kept_by_name(store: PolicyStore) -> None:
    changes = store.apply(
        [policy("acme", **tenant("acme")), policy("globex", ttl=30, **tenant("globex"))],
        actor="alice",
    )

    assert [p.name for p in changes.created] == ["acme", "globex"]
    assert {p.name: p.ttl for p in store.load()} == {"acme": 120, "globex": 30}

    changes = store.apply(
        [policy("acme", ttl=60, **tenant("acme")), policy("globex", ttl=30, **tenant("globex"))],
        actor="bob",
    )

    assert [(before.name, before.ttl, after.ttl) for before, after in changes.updated] == [
        ("acme", 120, 60)
    ]
    assert [p.name for p in changes.unchanged] == ["globex"]
    assert [v.version for v in store.history("acme")] == [1, 2]
    assert [v.version for v in store.history("globex")] == [1]


def test_conditions_and_issuer_round_trip_through_the_table(store: PolicyStore) -> None:
    wanted = policy(
        "eng",
        issuer=IDP,
        subject={
            "groups": {"contains": "eng"},
            "level": {"one_of": [1, 2]},
            "mfa": {"equals": True},
        },
    )
    store.apply([wanted], actor="alice")

    [loaded] = list(store.load())

    assert loaded == wanted.to_policy()
    assert loaded.issuer == IDP
    assert set(loaded.conditions) == {
        Condition("groups", "contains", ("eng",)),
        Condition("level", "one_of", (1, 2)),
        Condition("mfa", "equals", (True,)),
    }
    [mfa] = [c for c in loaded.conditions if c.claim == "mfa"]
    assert mfa.values[0] is True  # not 1: conditions compare with their type


def test_a_condition_value_changing_type_is_an_update(store: PolicyStore) -> None:
    # True == 1 in Python, but a condition on `mfa: true` and one on `mfa: 1` hold for different
    # tokens: the change must reach the table.
    store.apply([policy("code", subject={"mfa": {"equals": 1}})], actor="alice")

    changes = store.apply([policy("code", subject={"mfa": {"equals": True}})], actor="bob")

    assert [after.name for _, after in changes.updated] == ["code"]
    [loaded] = list(store.load())
    assert loaded.conditions[0].values[0] is True
    assert [v.document["subject"] for v in store.history("code")] == [
        {"mfa": {"equals": 1}},
        {"mfa": {"equals": True}},
    ]


def test_a_renamed_policy_without_prune_overlaps_its_old_self_and_changes_nothing(
    store: PolicyStore, engine: Engine
) -> None:
    store.apply([policy("old")], actor="alice")
    before = snapshot(engine)

    with pytest.raises(PolicyInvalid) as caught:
        store.apply([policy("new")], actor="bob")

    assert 'policy "new"' in str(caught.value)
    assert 'policy "old"' in str(caught.value)
    assert snapshot(engine) == before


def test_a_renamed_policy_with_prune_is_created_and_the_old_name_deleted(
    store: PolicyStore,
) -> None:
    store.apply([policy("old")], actor="alice")

    changes = store.apply([policy("new")], actor="bob", prune=True)

    assert [p.name for p in changes.created] == ["new"]
    assert [p.name for p in changes.deleted] == ["old"]
    assert [p.name for p in store.load()] == ["new"]
    assert [(v.version, v.action, v.changed_by) for v in store.history("old")] == [
        (1, "create", "alice"),
        (2, "delete", "bob"),
    ]
    assert [(v.version, v.action) for v in store.history("new")] == [(1, "create")]


# --- history ------------------------------------------------------------------------------------


def test_history_records_who_changed_what_and_when(store: PolicyStore, clock: FakeClock) -> None:
    started = clock.now
    store.apply([policy("code")], actor="alice")
    clock.advance(60)
    store.apply([policy("code", ttl=30, scopes=["code.read"])], actor="bob")
    clock.advance(60)
    store.apply([], actor="carol", prune=True)

    history = store.history("code")

    assert [(v.name, v.version, v.action, v.changed_by) for v in history] == [
        ("code", 1, "create", "alice"),
        ("code", 2, "update", "bob"),
        ("code", 3, "delete", "carol"),
    ]
    assert [v.changed_at for v in history] == [started, started + 60, started + 120]
    assert history[0].document["ttl"] == 120
    assert history[0].document["scopes"] == ["code.read", "code.search"]
    assert history[1].document["ttl"] == 30
    assert history[1].document["scopes"] == ["code.read"]
    # A deletion records what was deleted.
    assert history[2].document == history[1].document


def test_history_of_an_unknown_policy_is_empty(store: PolicyStore) -> None:
    store.apply([policy("code")], actor="alice")
    assert store.history("nope") == []


def test_history_is_per_name_not_per_target(store: PolicyStore) -> None:
    globex = policy("globex", **tenant("globex"))
    store.apply([policy("acme", **tenant("acme")), globex], actor="alice")
    store.apply([policy("acme", ttl=5, **tenant("acme")), globex], actor="bob")

    assert [v.version for v in store.history("acme")] == [1, 2]
    assert [v.version for v in store.history("globex")] == [1]


# --- rollback -----------------------------------------------------------------------------------


def test_rollback_to_an_earlier_version_creates_a_new_version_with_its_content(
    store: PolicyStore,
) -> None:
    original = policy("code", copy_claims=["email"], **tenant("acme"))
    store.apply([original], actor="alice")
    store.apply([policy("code", ttl=30, scopes=["code.read"], **tenant("globex"))], actor="bob")

    restored = store.rollback("code", 1, actor="carol")

    assert restored.version == 3
    assert restored.updated_by == "carol"
    assert restored.policy == original.to_policy()
    assert list(store.load()) == [original.to_policy()]
    history = store.history("code")
    assert [(v.version, v.action, v.changed_by) for v in history] == [
        (1, "create", "alice"),
        (2, "update", "bob"),
        (3, "rollback", "carol"),
    ]
    assert history[2].document == history[0].document


def test_rollback_to_a_version_written_before_reuse_tokens_existed_reuses(
    store: PolicyStore, engine: Engine
) -> None:
    store.apply([policy("code", ttl=45)], actor="alice")
    # Version 1 as it was recorded before the field existed: its document does not name it.
    with engine.begin() as connection:
        document = connection.scalar(text("SELECT document FROM policy_versions"))
        old = {k: v for k, v in json.loads(document).items() if k != "reuse_tokens"}
        connection.execute(
            text("UPDATE policy_versions SET document = :doc"), {"doc": json.dumps(old)}
        )
    store.apply([policy("code", ttl=30, reuse_tokens=False)], actor="bob")

    restored = store.rollback("code", 1, actor="carol")

    assert (restored.version, restored.policy.ttl) == (3, 45)
    assert restored.policy.reuse_tokens is True
    [loaded] = list(store.load())
    assert loaded.reuse_tokens is True
    assert [v.document.get("reuse_tokens") for v in store.history("code")] == [None, False, True]


def test_rollback_of_a_deleted_policy_recreates_it(store: PolicyStore) -> None:
    store.apply([policy("code", ttl=45)], actor="alice")
    store.apply([], actor="bob", prune=True)
    assert list(store.load()) == []

    restored = store.rollback("code", 1, actor="carol")

    assert restored.version == 3  # the history's numbering continues
    assert [(p.name, p.ttl) for p in store.load()] == [("code", 45)]
    assert [(v.version, v.action) for v in store.history("code")] == [
        (1, "create"),
        (2, "delete"),
        (3, "rollback"),
    ]
    stored = store.get("code")
    assert stored is not None
    assert stored.version == 3


def test_rollback_to_the_current_content_is_still_recorded(store: PolicyStore) -> None:
    store.apply([policy("code")], actor="alice")

    restored = store.rollback("code", 1, actor="bob")

    assert restored.version == 2
    assert [v.action for v in store.history("code")] == ["create", "rollback"]


@pytest.mark.parametrize(
    ("name", "version", "error"),
    [
        ("code", 2, PolicyInvalid),  # the deletion
        ("code", 9, PolicyNotFound),
        ("code", 0, PolicyNotFound),
        ("nope", 1, PolicyNotFound),
    ],
)
def test_impossible_rollback_is_refused_and_changes_nothing(
    store: PolicyStore, engine: Engine, name: str, version: int, error: type[Exception]
) -> None:
    store.apply([policy("code")], actor="alice")
    store.apply([], actor="bob", prune=True)
    before = snapshot(engine)

    with pytest.raises(error):
        store.rollback(name, version, actor="carol")

    assert snapshot(engine) == before


def test_rollback_whose_result_would_overlap_is_refused_and_changes_nothing(
    store: PolicyStore, engine: Engine
) -> None:
    store.apply([policy("a", **tenant("acme")), policy("b", **tenant("globex"))], actor="alice")
    # Move "a" off acme, then give acme to "b": restoring "a" at version 1 would overlap "b".
    store.apply([policy("a", **tenant("initech")), policy("b", **tenant("globex"))], actor="bob")
    store.apply([policy("a", **tenant("initech")), policy("b", **tenant("acme"))], actor="bob")
    before = snapshot(engine)

    with pytest.raises(PolicyInvalid) as caught:
        store.rollback("a", 1, actor="carol")

    assert "could match the same requests" in str(caught.value)
    assert snapshot(engine) == before


# --- enable, disable, delete: single-policy writes ------------------------------------------------


def test_disable_and_enable_are_versions_of_their_own(store: PolicyStore, engine: Engine) -> None:
    store.apply([policy("code", ttl=45)], actor="alice")

    disabled = store.set_enabled("code", False, actor="bob")
    enabled = store.set_enabled("code", True, actor="carol", if_version=2)

    assert (disabled.version, disabled.policy.enabled, disabled.updated_by) == (2, False, "bob")
    assert (enabled.version, enabled.policy.enabled) == (3, True)
    history = store.history("code")
    assert [(v.version, v.action, v.changed_by, v.document["enabled"]) for v in history] == [
        (1, "create", "alice", True),
        (2, "disable", "bob", False),
        (3, "enable", "carol", True),
    ]
    assert {k: v for k, v in history[1].document.items() if k != "enabled"} == {
        k: v for k, v in history[0].document.items() if k != "enabled"
    }
    with engine.connect() as connection:
        decisions = connection.execute(
            text("SELECT decision, actor, reason FROM audit_events ORDER BY id")
        ).all()
    assert [tuple(row) for row in decisions] == [
        ("policy_create", "alice", None),
        ("policy_disable", "bob", "disabled"),
        ("policy_enable", "carol", "enabled"),
    ]


def test_setting_the_state_a_policy_has_makes_no_version(
    store: PolicyStore, engine: Engine
) -> None:
    store.apply([policy("code")], actor="alice")
    before = snapshot(engine)

    stored = store.set_enabled("code", True, actor="bob", if_version=1)

    assert stored.version == 1
    after = snapshot(engine)
    for table in ("policies", "policy_versions"):  # the lease was taken, and let go
        assert after[table] == before[table]


def test_enabling_a_policy_that_would_overlap_is_refused(
    store: PolicyStore, engine: Engine
) -> None:
    store.apply([policy("code"), policy("twin", enabled=False)], actor="alice")
    before = snapshot(engine)

    with pytest.raises(PolicyInvalid, match="could match the same requests"):
        store.set_enabled("twin", True, actor="bob")

    assert snapshot(engine) == before


def test_delete_records_the_deletion_and_keeps_the_history(store: PolicyStore) -> None:
    store.apply([policy("code", ttl=45)], actor="alice")

    version = store.delete("code", actor="bob", if_version=1)

    assert version == 2
    assert store.get("code") is None
    assert list(store.load()) == []
    assert [(v.version, v.action, v.changed_by) for v in store.history("code")] == [
        (1, "create", "alice"),
        (2, "delete", "bob"),
    ]
    assert store.rollback("code", 1, actor="carol", if_version=2).policy.ttl == 45


@pytest.mark.parametrize(
    "write",
    [
        lambda store: store.set_enabled("code", False, actor="bob", if_version=1),
        lambda store: store.delete("code", actor="bob", if_version=1),
        lambda store: store.rollback("code", 1, actor="bob", if_version=1),
    ],
    ids=["disable", "delete", "rollback"],
)
def test_a_single_policy_write_of_a_stale_version_changes_nothing(
    store: PolicyStore, engine: Engine, write: Any
) -> None:
    store.apply([policy("code")], actor="alice")
    store.apply([policy("code", ttl=30)], actor="alice")
    before = snapshot(engine)

    with pytest.raises(StaleVersion) as caught:
        write(store)

    assert caught.value.current == 2
    assert snapshot(engine) == before


@pytest.mark.parametrize(
    "write",
    [
        lambda store: store.set_enabled("nope", True, actor="bob"),
        lambda store: store.delete("nope", actor="bob"),
        lambda store: store.rollback("nope", 1, actor="bob"),
    ],
    ids=["enable", "delete", "rollback"],
)
def test_a_single_policy_write_of_an_unknown_name_is_refused(
    store: PolicyStore, write: Any
) -> None:
    with pytest.raises(PolicyNotFound, match=r"^no policy nope$"):
        write(store)


# --- diff of two versions -----------------------------------------------------------------------


def test_diff_lists_the_fields_that_differ_between_two_versions(store: PolicyStore) -> None:
    store.apply([policy("code")], actor="alice")
    store.apply([policy("code", ttl=30, scopes=["code.read"], **tenant("acme"))], actor="bob")

    changes = store.diff("code", 1, 2)

    assert [c.as_dict() for c in changes] == [
        {"field": "subject", "before": None, "after": {"tenant": {"equals": "acme"}}},
        {"field": "scopes", "before": ["code.read", "code.search"], "after": ["code.read"]},
        {"field": "ttl", "before": 120, "after": 30},
    ]
    assert [c.key for c in store.diff("code", 2, 1)] == ["subject", "scopes", "ttl"]
    assert store.diff("code", 2, 2) == []


def test_diff_tells_a_boolean_from_an_integer(store: PolicyStore) -> None:
    store.apply([policy("code", subject={"level": {"equals": 1}})], actor="alice")
    store.apply([policy("code", subject={"level": {"equals": True}})], actor="bob")

    [change] = store.diff("code", 1, 2)

    assert (change.key, change.before, change.after) == (
        "subject",
        {"level": {"equals": 1}},
        {"level": {"equals": True}},
    )


def test_diff_of_a_missing_version_or_policy_is_refused(store: PolicyStore) -> None:
    store.apply([policy("code")], actor="alice")

    with pytest.raises(VersionNotFound, match=r"^policy code has no version 2$"):
        store.diff("code", 1, 2)
    with pytest.raises(PolicyNotFound, match=r"^no policy nope$") as caught:
        store.diff("nope", 1, 1)
    assert not isinstance(caught.value, VersionNotFound)


# --- what an apply replaces -----------------------------------------------------------------------


def test_apply_reports_the_newest_version_each_change_replaces(
    store: PolicyStore, clock: FakeClock
) -> None:
    store.apply([policy("code"), policy("wiki", "https://wiki.internal")], actor="alice")
    store.set_enabled("code", False, actor="admin:ops")
    store.delete("wiki", actor="bob")

    changes = store.apply(
        [policy("code", ttl=30), policy("wiki", "https://wiki.internal"),
         policy("new", "https://new.internal")],
        actor="carol",
        dry_run=True,
    )  # fmt: skip

    assert {name: (v.version, v.action, v.changed_by) for name, v in changes.previous.items()} == {
        "code": (2, "disable", "admin:ops"),
        "wiki": (2, "delete", "bob"),
    }
    assert changes.previous["code"].changed_at == clock.now


# --- a refused write changes nothing ------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        pytest.param(policy("intruder"), "could match the same requests", id="overlap"),
        pytest.param(
            policy("stranger", "https://x.internal", client_id="stranger"),
            "is not one of the configured clients",
            id="unknown-client",
        ),
        pytest.param(
            policy("alien", "https://x.internal", issuer="https://idp.evil"),
            "is not one of the trusted_issuers",
            id="unknown-issuer",
        ),
        pytest.param(
            policy("long", "https://x.internal", ttl=3000), "exceeds tokens.max_ttl", id="ttl"
        ),
    ],
)
@pytest.mark.parametrize("dry_run", [False, True], ids=["apply", "dry-run"])
def test_failed_apply_leaves_the_database_exactly_as_it_was(
    store: PolicyStore, engine: Engine, bad: PolicyConfig, reason: str, dry_run: bool
) -> None:
    store.apply([policy("code"), policy("tickets", TICKETS, **tenant("acme"))], actor="alice")
    before = snapshot(engine)

    # An update, a creation, a deletion (prune) and the bad policy, in one write.
    with pytest.raises(PolicyInvalid) as caught:
        store.apply(
            [policy("code", ttl=30), policy("wiki", "https://wiki.internal/mcp"), bad],
            actor="bob",
            prune=True,
            dry_run=dry_run,
        )

    assert reason in str(caught.value)
    assert f'policy "{bad.name}"' in str(caught.value)  # the refusal names the policy
    assert snapshot(engine) == before


def test_failed_apply_of_plain_policies_is_checked_like_a_file(
    store: PolicyStore, engine: Engine
) -> None:
    # Policies built in code (not parsed from a file) go through the same whole-set check.
    store.apply([policy("code")], actor="alice")
    before = snapshot(engine)
    twin = Policy(
        name="twin",
        client_id="gateway",
        audience="HTTPS://CODE-SEARCH.INTERNAL:443/mcp",
        scopes=frozenset({"code.read"}),
        default_scopes=frozenset({"code.read"}),
        ttl=60,
    )

    with pytest.raises(PolicyInvalid, match='policy "twin"'):
        store.apply([twin], actor="bob")

    assert snapshot(engine) == before


def test_dry_run_reports_what_the_apply_then_does(store: PolicyStore, engine: Engine) -> None:
    store.apply([policy("code"), policy("tickets", TICKETS)], actor="alice")
    wanted = [policy("code", ttl=30), policy("wiki", "https://wiki.internal/mcp")]
    before = snapshot(engine)

    planned = store.apply(wanted, actor="bob", prune=True, dry_run=True)
    assert snapshot(engine) == before
    done = store.apply(wanted, actor="bob", prune=True)

    def summary(changes: Any) -> tuple[list[str], list[tuple[Policy, Policy]], list[str]]:
        return (
            [p.name for p in changes.created],
            changes.updated,
            [p.name for p in changes.deleted],
        )

    assert summary(planned) == summary(done)
    assert summary(done)[0] == ["wiki"]
    assert summary(done)[2] == ["tickets"]
    assert snapshot(engine) != before


def test_dry_run_of_a_prune_to_nothing_changes_nothing(store: PolicyStore, engine: Engine) -> None:
    store.apply([policy("code"), policy("tickets", TICKETS)], actor="alice")
    before = snapshot(engine)

    changes = store.apply([], actor="bob", prune=True, dry_run=True)

    assert sorted(p.name for p in changes.deleted) == ["code", "tickets"]
    assert snapshot(engine) == before


# --- migration 0002 on a database holding 0001 data ---------------------------------------------


def upgrade_to(engine: Engine, revision: str) -> None:
    config = migrate.alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


OLD_DOCUMENT = (
    '{"client_id": "gateway", "audience": "https://code-search.internal/mcp", '
    '"scopes": ["code.read", "code.search"], "default_scopes": ["code.read"], "ttl": 90, '
    '"enabled": true, "require_subject_scopes": false, "copy_claims": ["email"]}'
)


def test_migration_0002_names_existing_policies_and_their_history(
    empty_engine: Engine, settings: Settings
) -> None:
    upgrade_to(empty_engine, "0001")
    with empty_engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO policies (client_id, audience, scopes, default_scopes, ttl, enabled,"
                " require_subject_scopes, copy_claims, version, updated_at, updated_by) VALUES"
                " ('gateway', :aud, '[\"code.read\", \"code.search\"]', '[\"code.read\"]', 90,"
                " :yes, :no, '[\"email\"]', 1, 1700000000.0, 'bootstrap')"
            ),
            {"aud": CODE_SEARCH, "yes": True, "no": False},
        )
        connection.execute(
            text(
                "INSERT INTO policy_versions (client_id, audience, version, action, document,"
                " changed_at, changed_by) VALUES ('gateway', :aud, 1, 'create', :doc,"
                " 1700000000.0, 'bootstrap')"
            ),
            {"aud": CODE_SEARCH, "doc": OLD_DOCUMENT},
        )

    upgrade_to(empty_engine, "head")

    assert migrate.is_current(empty_engine)
    name = f"gateway -> {CODE_SEARCH}"
    with empty_engine.connect() as connection:
        row = connection.execute(text("SELECT name, issuer, conditions FROM policies")).one()
        version_names = connection.scalars(text("SELECT name FROM policy_versions")).all()
    assert tuple(row) == (name, None, "[]")
    assert version_names == [name]

    store = PolicyStore(
        make_sessionmaker(empty_engine),
        FakeClock(1_800_000_000.0),
        validate=lambda ps: check_policy_set(ps, settings),
    )
    [loaded] = list(store.load())
    assert loaded.name == name
    assert (loaded.ttl, loaded.copy_claims, loaded.conditions) == (90, ("email",), ())
    assert loaded.reuse_tokens is True
    [old] = store.history(name)
    assert (old.version, old.action, old.changed_by) == (1, "create", "bootstrap")

    # The old one-policy-per-target constraint is gone: an exclusive second policy fits, and
    # the migrated policy's history continues under its name.
    store.apply(
        [
            policy(name, ttl=60, **tenant("acme")),
            policy("globex", **tenant("globex")),
        ],
        actor="alice",
    )
    assert {p.name for p in store.load()} == {name, "globex"}
    assert [v.version for v in store.history(name)] == [1, 2]

    # A version written before the migration (its document has no name) can be restored.
    store.apply([policy(name, ttl=60, **tenant("acme"))], actor="alice", prune=True)
    restored = store.rollback(name, 1, actor="carol")
    assert (restored.version, restored.policy.ttl, restored.policy.conditions) == (3, 90, ())
    assert restored.policy.reuse_tokens is True


def test_migration_0002_cuts_a_default_name_too_long_for_its_column(empty_engine: Engine) -> None:
    long_audience = "https://upstream.internal/" + "a" * 400
    upgrade_to(empty_engine, "0001")
    with empty_engine.begin() as connection:
        for audience in (long_audience, long_audience + "b"):
            connection.execute(
                text(
                    "INSERT INTO policies (client_id, audience, scopes, default_scopes, ttl,"
                    " enabled, require_subject_scopes, copy_claims, version, updated_at,"
                    " updated_by) VALUES ('gateway', :aud, '[\"a\"]', '[]', 60, :yes, :no, '[]',"
                    " 1, 1700000000.0, 'bootstrap')"
                ),
                {"aud": audience, "yes": True, "no": False},
            )
            connection.execute(
                text(
                    "INSERT INTO policy_versions (client_id, audience, version, action, document,"
                    " changed_at, changed_by) VALUES ('gateway', :aud, 1, 'create', '{}',"
                    " 1700000000.0, 'bootstrap')"
                ),
                {"aud": audience},
            )

    upgrade_to(empty_engine, "head")

    with empty_engine.connect() as connection:
        names = connection.scalars(text("SELECT name FROM policies ORDER BY id")).all()
        version_names = connection.scalars(
            text("SELECT name FROM policy_versions ORDER BY id")
        ).all()
    assert len(set(names)) == 2  # still unique
    assert all(len(name) <= 255 for name in names)
    assert all(name.startswith("gateway -> https://upstream.internal/aaa") for name in names)
    assert version_names == names  # each version follows its policy's name
