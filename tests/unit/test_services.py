"""One process's services (sidecar/services.py), built from the shared test settings on a real
SQLite file (and, marked ``postgres``, a real PostgreSQL database): what ``prepare`` does before
serving, the readiness checks, and the background work a serving worker starts and stops."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import create_engine, func, select

from sidecar.audit import AuditEvent
from sidecar.config import Settings, settings_from_mapping
from sidecar.errors import TemporarilyUnavailableError
from sidecar.keys.material import private_key_to_pem, public_jwk
from sidecar.services import Services
from sidecar.store import migrate
from sidecar.store.models import AuditEventRow
from tests.conftest import FakeClock, make_services

WAIT = 5.0


def background_threads() -> set[str]:
    """The names of the timer and listener threads alive in this process."""
    return {
        t.name
        for t in threading.enumerate()
        if t.name.startswith("refresh-") or t.name == "listen-changes"
    }


@pytest.fixture
def closing() -> Iterator[list[Services]]:
    """Services a test builds itself, closed after it."""
    built: list[Services] = []
    yield built
    for services in built:
        services.close()


# --- prepare --------------------------------------------------------------------------------------


def test_prepare_migrates_a_new_sqlite_database(
    settings: Settings, closing: list[Services]
) -> None:
    services = Services(settings)
    closing.append(services)
    assert not migrate.is_current(services.engine)

    services.prepare()

    assert migrate.is_current(services.engine)


def test_prepare_refuses_a_database_that_is_not_migrated(
    settings: Settings, closing: list[Services]
) -> None:
    services = Services(settings)
    closing.append(services)
    with pytest.raises(RuntimeError, match="schema is not current: run `sidecar db upgrade`"):
        services.prepare(migrate_sqlite=False)


def test_prepare_makes_a_key_that_signs(services: Services) -> None:
    stored = services.keys.load().current(services.clock())
    assert stored is not None
    assert services.signing_key().kid == stored.kid


def test_prepare_fills_an_empty_policy_table_from_the_configuration(
    services: Services, settings: Settings
) -> None:
    stored = services.policy_store.all()

    assert sorted(s.policy.name for s in stored) == sorted(
        p.to_policy().name for p in settings.policies
    )
    assert {s.updated_by for s in stored} == {"bootstrap"}


def test_prepare_leaves_a_policy_table_that_has_policies_alone(
    config: dict[str, Any], closing: list[Services]
) -> None:
    closing.append(make_services(settings_from_mapping(config, env={})))
    config["policies"] = config["policies"][:1]

    again = make_services(settings_from_mapping(config, env={}))
    closing.append(again)

    assert len(again.policy_store.all()) == 5  # the table, not the file, holds the policies now


def test_prepare_never_refills_a_policy_table_emptied_on_purpose(
    config: dict[str, Any], closing: list[Services]
) -> None:
    first = make_services(settings_from_mapping(config, env={}))
    closing.append(first)
    for stored in first.policy_store.all():
        first.policy_store.delete(stored.policy.name, actor="alice")

    again = make_services(settings_from_mapping(config, env={}))  # a restart
    closing.append(again)

    assert again.policy_store.all() == []  # every exchange denied, as the deletions meant
    assert again.policy_history_exists()


def test_prepare_warns_when_signing_keys_are_stored_unencrypted(
    settings: Settings, closing: list[Services], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sidecar.services")
    closing.append(make_services(settings))
    assert "SIGNING KEYS ARE STORED UNENCRYPTED" in caplog.text


def test_prepare_logs_each_weakness_of_the_configuration(
    config: dict[str, Any], closing: list[Services], caplog: pytest.LogCaptureFixture
) -> None:
    config["clients"][0]["client_secret"] = "short-secret"
    caplog.set_level(logging.WARNING, logger="sidecar.services")

    closing.append(make_services(settings_from_mapping(config, env={})))

    assert (
        "weak configuration: clients[0].client_secret is shorter than 16 characters" in caplog.text
    )
    assert "short-secret" not in caplog.text


# --- readiness ------------------------------------------------------------------------------------


def test_prepared_services_are_ready(services: Services) -> None:
    assert services.readiness() == {"database": True, "signing_key": True, "serving": True}


def test_a_draining_worker_is_not_ready_to_serve(services: Services) -> None:
    services.draining.set()
    assert services.readiness() == {"database": True, "signing_key": True, "serving": False}


def test_without_its_database_a_worker_is_not_ready(services: Services, sqlite_url: str) -> None:
    path = Path(sqlite_url.removeprefix("sqlite:///"))
    for suffix in ("", "-wal", "-shm"):
        part = path.with_name(path.name + suffix)
        if part.exists():
            part.rename(part.with_name(part.name + ".gone"))
    path.mkdir()  # a directory where the database file was: SQLite cannot open it
    services.engine.dispose()

    assert services.readiness()["database"] is False


# --- the signing key ------------------------------------------------------------------------------


@pytest.fixture
def key_directory(config: dict[str, Any], tmp_path: Path) -> Path:
    """The configuration's keyring is a directory of PEM files (empty so far)."""
    directory = tmp_path / "signing-keys"
    directory.mkdir()
    config["keys"] = {
        "rotate_every": "1h",
        "publish_ahead": "10m",
        "retain_after": "10m",
        "refresh_interval": "1s",
        "directory": str(directory),
    }
    return directory


def test_signing_key_is_temporarily_unavailable_when_no_key_signs(
    config: dict[str, Any], key_directory: Path, closing: list[Services]
) -> None:
    clock = FakeClock(1_800_000_000.0)
    key = ec.generate_private_key(ec.SECP256R1())
    path = key_directory / "a.pem"
    path.write_bytes(private_key_to_pem(key))
    os.utime(path, (clock.now - 3600, clock.now - 3600))
    services = make_services(settings_from_mapping(config, env={}), clock=clock)
    closing.append(services)
    assert services.signing_key().kid == public_jwk(key, "ES256")["kid"]

    path.unlink()  # the only key file removed from the mounted Secret
    clock.advance(2)  # past keys.refresh_interval: the keyring is read again

    with pytest.raises(TemporarilyUnavailableError) as caught:
        services.signing_key()
    assert (caught.value.error, caught.value.reason) == (
        "temporarily_unavailable",
        "no signing key",
    )
    assert services.readiness()["signing_key"] is False


# --- background work ------------------------------------------------------------------------------


def test_start_background_starts_the_timers_of_the_policies_and_the_keyring(
    services: Services,
) -> None:
    services.start_background()

    assert background_threads() == {"refresh-policies", "refresh-keyring"}
    assert services.listener is None  # SQLite has no notifications: the timers alone


def test_close_stops_the_timers(services: Services) -> None:
    services.start_background()
    services.close()
    assert background_threads() == set()


def test_close_twice_is_safe(services: Services) -> None:
    services.start_background()
    services.close()
    services.close()
    assert background_threads() == set()


def test_close_writes_the_queued_audit_events(services: Services, sqlite_url: str) -> None:
    services.audit.record(AuditEvent(at=1.0, subject="alice"))

    services.close()

    engine = create_engine(sqlite_url)
    try:
        with engine.connect() as connection:
            count = connection.scalar(
                select(func.count())
                .select_from(AuditEventRow)
                .where(AuditEventRow.subject == "alice")
            )
    finally:
        engine.dispose()
    assert count == 1


@pytest.mark.postgres
def test_on_postgresql_start_background_also_listens_for_changes_until_close(
    config: dict[str, Any], postgres_url: str, closing: list[Services]
) -> None:
    config["database_url"] = postgres_url
    services = make_services(settings_from_mapping(config, env={}))
    closing.append(services)

    services.start_background()

    assert services.listener is not None
    assert services.listener.listening.wait(WAIT)
    assert background_threads() == {"refresh-policies", "refresh-keyring", "listen-changes"}
    services.close()
    assert background_threads() == set()
