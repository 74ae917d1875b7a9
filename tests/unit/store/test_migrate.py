"""The Alembic migrations: an empty database reaches head, and the schema they build is the one
the SQLAlchemy models describe."""

from __future__ import annotations

import multiprocessing
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, UniqueConstraint, create_engine, inspect, text

from sidecar.store import migrate
from sidecar.store.db import make_sessionmaker
from sidecar.store.models import Base
from sidecar.store.policies import PolicyStore
from tests.conftest import CODE_SEARCH, FakeClock, fresh_postgres_database


def test_upgrade_of_an_empty_database_reaches_head(empty_engine: Engine) -> None:
    assert migrate.current_revision(empty_engine) is None
    assert not migrate.is_current(empty_engine)

    migrate.upgrade(empty_engine)

    assert migrate.current_revision(empty_engine) == migrate.head_revision()
    assert migrate.is_current(empty_engine)


def test_upgrade_twice_is_harmless(empty_engine: Engine) -> None:
    migrate.upgrade(empty_engine)

    migrate.upgrade(empty_engine)

    assert migrate.is_current(empty_engine)
    with empty_engine.connect() as connection:
        leases = connection.scalars(text("SELECT name FROM leases ORDER BY name")).all()
    assert leases == ["keyring", "policies"]


def test_migrated_tables_and_columns_match_the_models(empty_engine: Engine) -> None:
    migrate.upgrade(empty_engine)

    inspector = inspect(empty_engine)
    assert set(inspector.get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
    for name, table in Base.metadata.tables.items():
        reflected = {c["name"]: c for c in inspector.get_columns(name)}
        assert set(reflected) == set(table.columns.keys()), name
        for column in table.columns:
            found = reflected[column.name]
            where = f"{name}.{column.name}"
            assert found["nullable"] == column.nullable, where
            assert found["type"].python_type is column.type.python_type, where
            assert getattr(found["type"], "length", None) == getattr(column.type, "length", None), (
                where
            )
        primary_key = inspector.get_pk_constraint(name)["constrained_columns"]
        assert set(primary_key) == {c.name for c in table.primary_key.columns}, name
        # PostgreSQL also reports the index behind each unique constraint; those are compared
        # as constraints below.
        indexes = {
            (i["name"], tuple(i["column_names"]))
            for i in inspector.get_indexes(name)
            if "duplicates_constraint" not in i
        }
        expected_indexes = {(i.name, tuple(c.name for c in i.columns)) for i in table.indexes}
        assert indexes == expected_indexes, name
        uniques = {tuple(u["column_names"]) for u in inspector.get_unique_constraints(name)}
        expected_uniques = {
            tuple(c.name for c in constraint.columns)
            for constraint in table.constraints
            if isinstance(constraint, UniqueConstraint)
        }
        assert uniques == expected_uniques, name


def test_alembic_autogenerate_finds_no_difference(empty_engine: Engine) -> None:
    migrate.upgrade(empty_engine)

    with empty_engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)

    assert differences == []


# --- migration 0003 on a database holding 0002 data ---------------------------------------------


def migrate_to(engine: Engine, revision: str, *, down: bool = False) -> None:
    config = migrate.alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        (command.downgrade if down else command.upgrade)(config, revision)


# A policy and its history as 0002 wrote them: no reuse_tokens column, none in the document.
DOCUMENT_0002 = (
    '{"name": "code-search", "client_id": "gateway", "audience": "https://code-search.internal/mcp",'
    ' "scopes": ["code.read", "code.search"], "default_scopes": ["code.read"], "ttl": 90,'
    ' "enabled": true, "require_subject_scopes": true, "copy_claims": ["email"]}'
)


def insert_0002_policy(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO policies (name, client_id, audience, scopes, default_scopes, ttl,"
                " enabled, require_subject_scopes, copy_claims, version, updated_at, updated_by)"
                " VALUES ('code-search', 'gateway', :aud, '[\"code.read\", \"code.search\"]',"
                " '[\"code.read\"]', 90, :yes, :yes, '[\"email\"]', 1, 1700000000.0,"
                " 'bootstrap')"
            ),
            {"aud": CODE_SEARCH, "yes": True},
        )
        connection.execute(
            text(
                "INSERT INTO policy_versions (name, client_id, audience, version, action,"
                " document, changed_at, changed_by) VALUES ('code-search', 'gateway', :aud, 1,"
                " 'create', :doc, 1700000000.0, 'bootstrap')"
            ),
            {"aud": CODE_SEARCH, "doc": DOCUMENT_0002},
        )


def test_migration_0003_gives_existing_policies_reuse_tokens_true(empty_engine: Engine) -> None:
    migrate_to(empty_engine, "0002")
    insert_0002_policy(empty_engine)

    migrate_to(empty_engine, "0003")

    with empty_engine.connect() as connection:
        [reuse] = connection.scalars(text("SELECT reuse_tokens FROM policies")).all()
    assert bool(reuse) is True
    migrate.upgrade(empty_engine)  # the code reads and writes the newest schema
    store = PolicyStore(make_sessionmaker(empty_engine), FakeClock(1_800_000_000.0))
    [loaded] = list(store.load())
    assert loaded.reuse_tokens is True
    assert (loaded.ttl, loaded.require_subject_scopes) == (90, True)  # the rest is untouched
    # The history written before the column existed restores as reusing.
    restored = store.rollback("code-search", 1, actor="carol")
    assert restored.policy.reuse_tokens is True
    assert restored.policy == loaded


def test_migration_0003_server_default_fills_rows_written_without_the_column(
    empty_engine: Engine,
) -> None:
    migrate_to(empty_engine, "0003")
    insert_0002_policy(empty_engine)  # an INSERT that does not name reuse_tokens

    with empty_engine.connect() as connection:
        [reuse] = connection.scalars(text("SELECT reuse_tokens FROM policies")).all()
    assert bool(reuse) is True


def test_migration_0003_downgrades_to_0002(empty_engine: Engine) -> None:
    migrate_to(empty_engine, "0003")
    insert_0002_policy(empty_engine)

    migrate_to(empty_engine, "0002", down=True)

    assert migrate.current_revision(empty_engine) == "0002"
    columns = {c["name"] for c in inspect(empty_engine).get_columns("policies")}
    assert "reuse_tokens" not in columns
    assert "require_subject_scopes" in columns
    with empty_engine.connect() as connection:
        assert connection.scalars(text("SELECT name FROM policies")).all() == ["code-search"]


# Every migration file, in order (sidecar/migrations/versions/): each upgrade and its downgrade
# run one step at a time.
MIGRATION_FILES = (
    "0001_initial",
    "0002_policy_names_conditions",
    "0003_policy_reuse_tokens",
    "0004_audit_operations",
    "0005_policy_credentials",
)


def test_every_migration_file_is_a_step_of_the_chain() -> None:
    versions = sorted(p.stem for p in (migrate.MIGRATIONS_DIR / "versions").glob("0*.py"))
    assert tuple(versions) == MIGRATION_FILES
    assert migrate.head_revision() == MIGRATION_FILES[-1].split("_")[0]


def test_each_migration_goes_up_and_down_one_step(empty_engine: Engine) -> None:
    revisions = [name.split("_")[0] for name in MIGRATION_FILES]
    for revision in revisions:
        migrate_to(empty_engine, revision)
        assert migrate.current_revision(empty_engine) == revision
    for previous in reversed(revisions[:-1]):
        migrate_to(empty_engine, previous, down=True)
        assert migrate.current_revision(empty_engine) == previous


def test_migration_0004_adds_the_audit_columns_and_indexes(empty_engine: Engine) -> None:
    migrate_to(empty_engine, "0004")

    inspector = inspect(empty_engine)
    columns = {c["name"] for c in inspector.get_columns("audit_events")}
    indexes = {tuple(i["column_names"]) for i in inspector.get_indexes("audit_events")}
    assert {"request_id", "latency_ms", "policies"} <= columns
    assert {("at",), ("jti",), ("subject",), ("client_id",)} <= indexes


def _upgrade_after(url: str, barrier: Any, outcomes: Any) -> None:
    """In a child process: migrate ``url`` as soon as every sibling is ready too."""
    from sidecar.store.db import make_engine

    engine = make_engine(url)
    barrier.wait(timeout=30)
    try:
        migrate.upgrade(engine)
        outcomes.put("ok")
    except Exception as exc:  # the parent asserts on it
        outcomes.put(type(exc).__name__)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_three_processes_migrating_a_new_postgres_database_at_once_all_succeed() -> None:
    # Released by one barrier, without the advisory lock two of the three fail with a
    # UniqueViolation on PostgreSQL's catalog (both create alembic_version).
    context = multiprocessing.get_context("spawn")
    with fresh_postgres_database("sidecar_migrate_race") as url:
        barrier, outcomes = context.Barrier(3), context.Queue()
        processes = [
            context.Process(target=_upgrade_after, args=(url, barrier, outcomes)) for _ in range(3)
        ]
        for process in processes:
            process.start()
        try:
            results = [outcomes.get(timeout=120) for _ in processes]
        finally:
            for process in processes:
                process.join(timeout=30)
                if process.is_alive():
                    process.kill()
        assert results == ["ok", "ok", "ok"]
        engine = create_engine(url)
        try:
            assert migrate.current_revision(engine) == migrate.head_revision()
        finally:
            engine.dispose()


def test_migration_0005_keeps_existing_policies_minting(empty_engine: Engine) -> None:
    migrate_to(empty_engine, "0002")
    insert_0002_policy(empty_engine)

    migrate.upgrade(empty_engine)

    store = PolicyStore(make_sessionmaker(empty_engine), FakeClock(1_800_000_000.0))
    [loaded] = list(store.load())
    assert (loaded.credential, loaded.upstream) == ("mint", None)
    migrate_to(empty_engine, "0004", down=True)
    with empty_engine.connect() as connection:
        columns = {c["name"] for c in inspect(connection).get_columns("policies")}
    assert "credential" not in columns
