"""Replay protection for client-assertion ``jti``s (RFC 7523 §3 item 7), in the database."""

from __future__ import annotations

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from sidecar.store.jtis import JtiStore
from sidecar.store.models import ClientAssertionJtiRow
from tests.conftest import FakeClock


def stored_jtis(engine: Engine) -> set[tuple[str, str]]:
    with engine.connect() as connection:
        rows = connection.execute(
            select(ClientAssertionJtiRow.client_id, ClientAssertionJtiRow.jti)
        )
        return {(row.client_id, row.jti) for row in rows}


def test_first_use_of_a_jti_is_accepted(
    sessions: sessionmaker[Session], clock: FakeClock, engine: Engine
) -> None:
    jtis = JtiStore(sessions, clock)

    assert jtis.remember("jwt-gateway", "jti-1", expires_at=clock.now + 60) is True
    assert stored_jtis(engine) == {("jwt-gateway", "jti-1")}


def test_replayed_jti_is_refused(sessions: sessionmaker[Session], clock: FakeClock) -> None:
    jtis = JtiStore(sessions, clock)
    jtis.remember("jwt-gateway", "jti-1", expires_at=clock.now + 60)

    assert jtis.remember("jwt-gateway", "jti-1", expires_at=clock.now + 60) is False


def test_replay_is_refused_by_another_worker(
    sessions: sessionmaker[Session], clock: FakeClock
) -> None:
    JtiStore(sessions, clock).remember("jwt-gateway", "jti-1", expires_at=clock.now + 60)

    assert JtiStore(sessions, clock).remember("jwt-gateway", "jti-1", clock.now + 60) is False


def test_jtis_are_namespaced_per_client(sessions: sessionmaker[Session], clock: FakeClock) -> None:
    jtis = JtiStore(sessions, clock)
    jtis.remember("jwt-gateway", "shared-jti", expires_at=clock.now + 60)

    assert jtis.remember("other-client", "shared-jti", expires_at=clock.now + 60) is True


def test_empty_or_oversized_jti_is_refused(
    sessions: sessionmaker[Session], clock: FakeClock, engine: Engine
) -> None:
    jtis = JtiStore(sessions, clock)

    assert jtis.remember("jwt-gateway", "", expires_at=clock.now + 60) is False
    assert jtis.remember("jwt-gateway", "x" * 256, expires_at=clock.now + 60) is False
    assert stored_jtis(engine) == set()


def test_expired_jtis_are_purged(
    sessions: sessionmaker[Session], clock: FakeClock, engine: Engine
) -> None:
    jtis = JtiStore(sessions, clock)
    jtis.remember("jwt-gateway", "old", expires_at=clock.now + 30)
    jtis.remember("jwt-gateway", "live", expires_at=clock.now + 600)

    clock.advance(120)  # "old" has expired and the purge interval has passed
    jtis.remember("jwt-gateway", "new", expires_at=clock.now + 60)

    assert stored_jtis(engine) == {("jwt-gateway", "live"), ("jwt-gateway", "new")}
