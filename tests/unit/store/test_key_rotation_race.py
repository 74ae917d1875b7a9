"""Two instances of the service on one database racing to rotate (issue 4): the ``keyring``
lease, not luck, makes exactly one of them perform each rotation.

Each instance is a ``Services`` with its own engine (its own connections), as two replicas or two
gunicorn workers have; they race from threads released together by a barrier, at the same fake
time, on a real SQLite file and on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from sidecar.config import Settings
from sidecar.keys.keyring import NEXT, Keyring
from sidecar.services import Services
from sidecar.store.models import SigningKeyRow
from tests.conftest import HOURLY_KEYS, FakeClock, make_services
from tests.unit.support import race

ROTATE_EVERY = 3600.0
PUBLISH_AHEAD = 600.0
ROUNDS = 4


@pytest.fixture
def config(config: dict[str, Any], database_url: str) -> dict[str, Any]:
    config["database_url"] = database_url
    config["keys"] = dict(HOURLY_KEYS)
    return config


@pytest.fixture
def instances(settings: Settings, clock: FakeClock) -> Iterator[list[Services]]:
    """Two instances started on one database: the first generates the signing key."""
    started: list[Services] = []
    try:
        for _ in range(2):
            started.append(make_services(settings, clock=clock))
        yield started
    finally:
        for services in started:
            services.engine.dispose()


def stored_kids(services: Services) -> set[str]:
    with services.engine.connect() as connection:
        return set(connection.scalars(select(SigningKeyRow.kid)))


def current_kid(services: Services) -> str:
    current = services.keys.load().current(services.clock())
    assert current is not None
    return current.kid


def test_instances_racing_when_a_rotation_is_due_create_exactly_one_key(
    instances: list[Services], clock: FakeClock
) -> None:
    for _ in range(ROUNDS):
        signing = instances[0].keys.load().current(clock.now)
        assert signing is not None
        before = stored_kids(instances[0])
        clock.now = signing.activates_at + ROTATE_EVERY - PUBLISH_AHEAD  # due on both

        keyrings: list[Keyring] = race(instances, lambda services: services.keyring.refresh())

        created = stored_kids(instances[0]) - before
        assert len(created) == 1, created
        [new] = created
        upcoming = [keyring.upcoming(clock.now) for keyring in keyrings]
        assert [key.kid if key else None for key in upcoming] == [new, new]
        for keyring in keyrings:  # both instances now hold the same keyring
            assert {k.kid for k in keyring.published(clock.now)} == {signing.kid, new}
        # Keys past their retention were deleted: the database holds the current and next only.
        assert stored_kids(instances[0]) == {signing.kid, new}

        clock.now = signing.activates_at + ROTATE_EVERY
        assert current_kid(instances[0]) == current_kid(instances[1]) == new


def test_instances_racing_keys_rotate_create_exactly_one_pending_key(
    instances: list[Services], clock: FakeClock
) -> None:
    for _ in range(ROUNDS):
        signing = current_kid(instances[0])
        before = stored_kids(instances[0])

        started = race(instances, lambda services: services.keys.rotate())

        created = stored_kids(instances[0]) - before
        assert len(created) == 1, created
        [new] = created
        assert [key.kid for key in started] == [new, new]
        keyring = instances[1].keys.load()
        assert [k.kid for k in keyring.keys if k.state(clock.now) == NEXT] == [new]
        assert current_kid(instances[1]) == signing

        clock.now = started[0].activates_at
        assert current_kid(instances[0]) == new
