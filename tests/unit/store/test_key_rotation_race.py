"""Two instances of the service on one database racing to rotate (issue 4): the ``keyring``
lease, not luck, makes exactly one of them perform each rotation.

Each instance is a ``Services`` with its own engine (its own connections), as two replicas or two
gunicorn workers have; they race from threads released together by a barrier, at the same fake
time, on a real SQLite file and on PostgreSQL.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from sqlalchemy import select

from sidecar.config import Settings
from sidecar.keys.keyring import NEXT, Keyring
from sidecar.services import Services
from sidecar.store.models import SigningKeyRow
from tests.conftest import FakeClock, make_services

ROTATE_EVERY = 3600.0
PUBLISH_AHEAD = 600.0
ROUNDS = 4
T = TypeVar("T")


@pytest.fixture
def config(config: dict[str, Any], database_url: str) -> dict[str, Any]:
    config["database_url"] = database_url
    config["keys"] = {
        "rotate_every": "1h",
        "publish_ahead": "10m",
        "retain_after": "10m",
        "refresh_interval": "1s",
    }
    return config


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


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


def race(instances: list[Services], action: Callable[[Services], T]) -> list[T]:
    """Run ``action`` on every instance at once, each from its own thread."""
    barrier = threading.Barrier(len(instances))
    results: list[T] = []
    errors: list[BaseException] = []

    def run(services: Services) -> None:
        barrier.wait()
        try:
            results.append(action(services))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in instances]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert errors == []
    assert len(results) == len(instances)
    return results


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
