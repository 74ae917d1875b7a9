"""A value loaded from the database and kept in process for a bounded time."""

from __future__ import annotations

import threading

import pytest

from sidecar.errors import TemporarilyUnavailableError
from sidecar.refreshing import RETRY_AFTER_FAILURE, Refreshing
from tests.conftest import FakeClock

INTERVAL = 10.0


class Loader:
    """Returns 1, 2, 3... on each load, or raises while ``failing``; counts calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.failing = False

    def __call__(self) -> int:
        self.calls += 1
        if self.failing:
            raise ConnectionError("database is down")
        return self.calls


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def load() -> Loader:
    return Loader()


@pytest.fixture
def value(load: Loader, clock: FakeClock) -> Refreshing[int]:
    return Refreshing("policies", load, INTERVAL, clock)


def test_value_is_loaded_on_first_use_and_cached_within_the_interval(
    value: Refreshing[int], load: Loader, clock: FakeClock
) -> None:
    assert value.get() == 1
    clock.advance(INTERVAL - 0.1)
    assert value.get() == 1
    assert load.calls == 1


def test_value_is_reloaded_after_the_interval(
    value: Refreshing[int], load: Loader, clock: FakeClock
) -> None:
    value.get()
    clock.advance(INTERVAL)
    assert value.get() == 2
    clock.advance(INTERVAL / 2)
    assert value.get() == 2
    assert load.calls == 2


def test_failed_reload_keeps_the_previous_value(
    value: Refreshing[int], load: Loader, clock: FakeClock
) -> None:
    value.get()
    load.failing = True
    clock.advance(INTERVAL)

    assert value.get() == 1
    assert load.calls == 2


def test_failed_reload_is_not_retried_on_every_request(
    value: Refreshing[int], load: Loader, clock: FakeClock
) -> None:
    value.get()
    load.failing = True
    clock.advance(INTERVAL)
    for _ in range(50):
        assert value.get() == 1
    assert load.calls == 2

    clock.advance(1.0)
    assert value.get() == 1
    assert load.calls == 3


def test_recovers_once_loading_works_again(
    value: Refreshing[int], load: Loader, clock: FakeClock
) -> None:
    value.get()
    load.failing = True
    clock.advance(INTERVAL)
    value.get()

    load.failing = False
    clock.advance(1.0)
    assert value.get() == 3


def test_nothing_loaded_is_temporarily_unavailable(value: Refreshing[int], load: Loader) -> None:
    load.failing = True

    with pytest.raises(TemporarilyUnavailableError) as caught:
        value.get()
    assert caught.value.error == "temporarily_unavailable"
    assert caught.value.status_code == 503
    assert "database is down" not in caught.value.description


def test_nothing_loaded_is_refused_at_once_then_retried_after_the_back_off(
    value: Refreshing[int], load: Loader, clock: FakeClock
) -> None:
    load.failing = True
    with pytest.raises(TemporarilyUnavailableError):
        value.get()
    load.failing = False
    calls = load.calls

    # Within the back-off a request does not wait on the database again: a 503 at once.
    with pytest.raises(TemporarilyUnavailableError):
        value.get()
    assert load.calls == calls

    clock.advance(RETRY_AFTER_FAILURE)
    assert value.get() == 2


def test_refresh_loads_now_and_raises_on_failure(
    value: Refreshing[int], load: Loader, clock: FakeClock
) -> None:
    assert value.get() == 1
    assert value.refresh() == 2
    assert value.get() == 2

    load.failing = True
    with pytest.raises(ConnectionError):
        value.refresh()
    assert value.get() == 2  # the previous value is still served


def test_invalidate_forces_a_reload_on_next_use(
    value: Refreshing[int], load: Loader, clock: FakeClock
) -> None:
    value.get()
    value.invalidate()
    assert value.get() == 2


def test_a_stale_value_is_served_while_another_thread_reloads(clock: FakeClock) -> None:
    started, release = threading.Event(), threading.Event()
    calls = []

    def slow_load() -> int:
        calls.append(1)
        if len(calls) == 2:  # the reload: blocks until released
            started.set()
            release.wait(5)
        return len(calls)

    value = Refreshing("keyring", slow_load, INTERVAL, clock)
    assert value.get() == 1
    clock.advance(INTERVAL)

    reloader = threading.Thread(target=value.get)
    reloader.start()
    assert started.wait(5)
    try:
        assert value.get() == 1  # does not wait for the reload in progress
    finally:
        release.set()
        reloader.join(5)
    assert value.get() == 2
    assert len(calls) == 2


def test_concurrent_first_requests_wait_for_the_one_load_instead_of_failing() -> None:
    # A fresh worker gets several requests at once: the first loads, the others must wait for
    # that load (bounded), not be refused because "an attempt was made a moment ago".
    import threading
    import time as real_time

    started = threading.Event()
    calls: list[int] = []

    def slow_load() -> int:
        calls.append(1)
        started.set()
        real_time.sleep(0.2)
        return 42

    value: Refreshing[int] = Refreshing("slow", slow_load, 60.0, FakeClock(1000.0))
    results: list[object] = []

    def get() -> None:
        try:
            results.append(value.get())
        except TemporarilyUnavailableError as exc:
            results.append(exc)

    first = threading.Thread(target=get)
    first.start()
    started.wait(5)
    others = [threading.Thread(target=get) for _ in range(4)]
    for thread in others:
        thread.start()
    for thread in [first, *others]:
        thread.join(5)

    assert results == [42] * 5
    assert len(calls) == 1


def test_on_the_event_loop_a_first_load_is_never_waited_for(
    value: Refreshing[int], load: Loader
) -> None:
    from sidecar.blocking import WouldBlock, on_event_loop

    with on_event_loop(), pytest.raises(WouldBlock):
        value.get()
    assert load.calls == 0  # the request is answered again on a thread, which loads
    assert value.get() == 1


def test_on_the_event_loop_a_stale_value_is_served_and_reloaded_in_the_background(
    value: Refreshing[int], load: Loader, clock: FakeClock
) -> None:
    from sidecar.blocking import on_event_loop

    value.get()
    clock.advance(INTERVAL)
    with on_event_loop():
        assert value.get() == 1
    value.join_reload()
    assert value.get() == 2
