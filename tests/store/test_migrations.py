"""The Alembic migrations: an empty database reaches head, and the schema they build is the one
the SQLAlchemy models describe."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, UniqueConstraint, inspect, text

from sidecar.store import migrate
from sidecar.store.models import Base


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
