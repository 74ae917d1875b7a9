"""The database-backed keyring (sidecar/store/keys.py): first key, rotation, retirement,
maintenance, encryption at rest, and one key when several processes start at once."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from sidecar.config import KeysConfig
from sidecar.keys.keyring import CURRENT, NEXT, PREVIOUS
from sidecar.store.db import make_engine, make_sessionmaker
from sidecar.store.keys import KeyDecryptionError, KeyStore
from sidecar.store.models import SigningKeyRow
from tests.conftest import FakeClock
from tests.unit.support import race

ROTATE_EVERY = 24 * 3600.0
PUBLISH_AHEAD = 15 * 60.0
RETAIN_AFTER = 20 * 60.0
ENCRYPTION_KEY = "correct horse battery staple"


def keys_config(**overrides: Any) -> KeysConfig:
    values: dict[str, Any] = {
        "rotate_every": ROTATE_EVERY,
        "publish_ahead": PUBLISH_AHEAD,
        "retain_after": RETAIN_AFTER,
    }
    values.update(overrides)
    return KeysConfig.model_validate(values)


def stored_rows(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return list(connection.execute(select(SigningKeyRow)))


@pytest.fixture
def keys(sessions: sessionmaker[Session], clock: FakeClock) -> KeyStore:
    return KeyStore(sessions, keys_config(), "ES256", clock)


@pytest.fixture
def first_kid(keys: KeyStore, clock: FakeClock) -> str:
    """The kid of the first key, which ``ensure_current()`` generated and made current."""
    keys.ensure_current()
    current = keys.load().current(clock.now)
    assert current is not None
    return current.kid


def test_ensure_current_generates_exactly_one_key(keys: KeyStore, engine: Engine) -> None:
    assert keys.ensure_current() is True
    assert keys.ensure_current() is False

    [row] = stored_rows(engine)
    assert row.algorithm == "ES256"
    current = keys.load().current(keys._clock())
    assert current is not None
    assert current.kid == row.kid


def test_rotate_publishes_a_next_key_that_activates_publish_ahead_later(
    keys: KeyStore, clock: FakeClock
) -> None:
    keys.ensure_current()
    old = keys.load().current(clock.now)
    assert old is not None
    clock.advance(100)

    new = keys.rotate()

    assert new.kid != old.kid
    assert new.activates_at == clock.now + PUBLISH_AHEAD
    keyring = keys.load()
    assert keyring.find(new.kid).state(clock.now) == NEXT  # type: ignore[union-attr]
    assert keyring.current(clock.now).kid == old.kid  # type: ignore[union-attr]
    assert {k.kid for k in keyring.published(clock.now)} == {old.kid, new.kid}


def test_rotation_retires_the_old_key_when_the_new_one_activates(
    keys: KeyStore, clock: FakeClock, first_kid: str
) -> None:
    new = keys.rotate()

    old = keys.load().find(first_kid)
    assert old is not None
    assert old.retires_at == new.activates_at
    assert old.removes_at == new.activates_at + RETAIN_AFTER

    clock.advance(PUBLISH_AHEAD)
    keyring = keys.load()
    assert keyring.current(clock.now).kid == new.kid  # type: ignore[union-attr]
    assert keyring.find(first_kid).state(clock.now) == PREVIOUS  # type: ignore[union-attr]
    assert first_kid in {k.kid for k in keyring.published(clock.now)}


def test_rotate_during_a_rotation_returns_the_pending_key(keys: KeyStore, engine: Engine) -> None:
    keys.ensure_current()
    first = keys.rotate()

    second = keys.rotate()

    assert second.kid == first.kid
    assert len(stored_rows(engine)) == 2


def test_immediate_rotation_signs_with_the_new_key_at_once(
    keys: KeyStore, clock: FakeClock, first_kid: str
) -> None:
    new = keys.rotate(immediate=True)

    keyring = keys.load()
    assert new.activates_at == clock.now
    assert keyring.current(clock.now).kid == new.kid  # type: ignore[union-attr]
    old = keyring.find(first_kid)
    assert old is not None
    assert old.state(clock.now) == PREVIOUS
    assert old.removes_at == clock.now + RETAIN_AFTER


def test_immediate_rotation_brings_a_pending_key_forward(
    keys: KeyStore, clock: FakeClock, engine: Engine
) -> None:
    keys.ensure_current()
    pending = keys.rotate()

    promoted = keys.rotate(immediate=True)

    assert promoted.kid == pending.kid
    assert keys.load().current(clock.now).kid == pending.kid  # type: ignore[union-attr]
    assert len(stored_rows(engine)) == 2


def test_retire_stops_a_key_signing_and_keeps_it_published(
    keys: KeyStore, clock: FakeClock, first_kid: str
) -> None:
    assert keys.retire(first_kid) is True

    keyring = keys.load()
    assert keyring.current(clock.now) is None
    retired = keyring.find(first_kid)
    assert retired is not None
    assert retired.state(clock.now) == PREVIOUS
    assert retired.removes_at == clock.now + RETAIN_AFTER
    assert keys.ensure_current() is True  # a replacement is generated


def test_retire_of_an_unknown_kid_is_false(keys: KeyStore) -> None:
    keys.ensure_current()

    assert keys.retire("no-such-kid") is False


def test_maintain_deletes_keys_past_their_removal(
    keys: KeyStore, clock: FakeClock, engine: Engine, first_kid: str
) -> None:
    new = keys.rotate()
    clock.advance(PUBLISH_AHEAD + RETAIN_AFTER - 1)
    assert len(keys.maintain().keys) == 2  # still within its publication window

    clock.advance(1)
    keyring = keys.maintain()

    assert [k.kid for k in keyring.keys] == [new.kid]
    assert [row.kid for row in stored_rows(engine)] == [new.kid]
    assert first_kid not in {k.kid for k in keyring.published(clock.now)}


def test_maintain_starts_a_rotation_when_one_is_due(keys: KeyStore, clock: FakeClock) -> None:
    keys.ensure_current()
    clock.advance(ROTATE_EVERY - PUBLISH_AHEAD - 1)
    assert len(keys.maintain().keys) == 1  # not due yet

    clock.advance(1)
    keyring = keys.maintain()

    assert len(keyring.keys) == 2
    upcoming = keyring.upcoming(clock.now)
    assert upcoming is not None
    assert upcoming.activates_at == clock.now + PUBLISH_AHEAD


def test_maintain_generates_a_key_when_none_signs(keys: KeyStore, clock: FakeClock) -> None:
    keyring = keys.maintain()

    current = keyring.current(clock.now)
    assert current is not None
    assert current.state(clock.now) == CURRENT


def test_encrypted_private_keys_never_reach_the_database_in_clear(
    sessions: sessionmaker[Session], clock: FakeClock, engine: Engine
) -> None:
    keys = KeyStore(sessions, keys_config(encryption_key=ENCRYPTION_KEY), "ES256", clock)
    keys.ensure_current()
    keys.rotate()

    rows = stored_rows(engine)
    assert len(rows) == 2
    for row in rows:
        assert b"PRIVATE KEY" not in bytes(row.private_key)
        assert row.encryption is not None
    # A fresh store (another worker) decrypts them.
    fresh = KeyStore(sessions, keys_config(encryption_key=ENCRYPTION_KEY), "ES256", clock)
    assert len(fresh.load().keys) == 2


def test_unencrypted_store_writes_pem(keys: KeyStore, engine: Engine) -> None:
    keys.ensure_current()

    [row] = stored_rows(engine)
    assert b"PRIVATE KEY" in bytes(row.private_key)
    assert row.encryption is None


def test_wrong_encryption_key_raises_on_load(
    sessions: sessionmaker[Session], clock: FakeClock
) -> None:
    KeyStore(sessions, keys_config(encryption_key=ENCRYPTION_KEY), "ES256", clock).ensure_current()
    wrong = KeyStore(
        sessions, keys_config(encryption_key="not the right key at all"), "ES256", clock
    )

    with pytest.raises(KeyDecryptionError) as error:
        wrong.load()

    assert ENCRYPTION_KEY not in str(error.value)


def test_encrypted_keys_without_an_encryption_key_raise_on_load(
    sessions: sessionmaker[Session], clock: FakeClock
) -> None:
    KeyStore(sessions, keys_config(encryption_key=ENCRYPTION_KEY), "ES256", clock).ensure_current()

    with pytest.raises(KeyDecryptionError):
        KeyStore(sessions, keys_config(), "ES256", clock).load()


def test_processes_racing_at_start_create_exactly_one_key(
    database_url: str, engine: Engine, clock: FakeClock
) -> None:
    # Two "processes": each has its own engine (own connections) and its own store.
    engines = [make_engine(database_url) for _ in range(2)]
    stores = [KeyStore(make_sessionmaker(e), keys_config(), "ES256", clock) for e in engines]
    try:
        results = race(stores, KeyStore.ensure_current, timeout=10)
    finally:
        for e in engines:
            e.dispose()

    assert sorted(results) == [False, True]
    assert len(stored_rows(engine)) == 1
