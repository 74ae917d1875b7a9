"""A value loaded from the database and kept in process for a bounded time (sidecar/refreshing.py):
no decision on a copy older than the interval, counted from the start of the load behind it."""

from __future__ import annotations

import threading
import time

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


class Table:
    """What the database holds: a load reads ``state`` (counted)."""

    def __init__(self, state: str) -> None:
        self.state = state
        self.loads = 0

    def __call__(self) -> str:
        self.loads += 1
        return self.state


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def load() -> Loader:
    return Loader()


@pytest.fixture
def value(load: Loader, clock: FakeClock) -> Refreshing[int]:
    return Refreshing("policies", load, INTERVAL, clock)


def unavailable(value: Refreshing[int]) -> bool:
    try:
        value.get()
    except TemporarilyUnavailableError:
        return True
    return False


# --- within and past the bound ------------------------------------------------------------------


def test_value_is_loaded_on_first_use_and_cached_within_the_interval(
    value: Refreshing[int], load: Loader, clock: FakeClock
) -> None:
    assert value.get() == 1
    clock.advance(INTERVAL - 0.1)
    assert value.get() == 1
    assert load.calls == 1


def test_value_is_reloaded_at_the_bound(
    value: Refreshing[int], load: Loader, clock: FakeClock
) -> None:
    value.get()
    clock.advance(INTERVAL)
    assert value.get() == 2
    clock.advance(INTERVAL / 2)
    assert value.get() == 2
    assert load.calls == 2


@pytest.mark.parametrize("idle", [INTERVAL, 3.3 * INTERVAL, 7.3 * INTERVAL])
def test_the_first_use_after_a_quiet_spell_decides_on_the_state_of_now(
    clock: FakeClock, idle: float
) -> None:
    # The reported bug: after 33 s or 73 s without requests (a 10 s bound), a policy disabled
    # meanwhile still granted once, the holder answering from its old copy while it reloaded
    # behind the request.
    table = Table("enabled")
    holder = Refreshing("policies", table, INTERVAL, clock)
    assert holder.get() == "enabled"

    clock.advance(idle - 1)
    table.state = "disabled"  # committed one second before the request
    clock.advance(1)

    assert holder.get() == "disabled"  # the very first use, synchronously reloaded
    assert table.loads == 2


def test_within_the_bound_a_copy_may_miss_a_change_committed_after_its_load_started(
    clock: FakeClock,
) -> None:
    table = Table("enabled")
    holder = Refreshing("policies", table, INTERVAL, clock)
    holder.get()
    table.state = "disabled"

    clock.advance(INTERVAL - 0.001)
    assert holder.get() == "enabled"  # allowed: the change is younger than the bound
    clock.advance(0.001)
    assert holder.get() == "disabled"  # never past it


def test_the_bound_counts_from_the_start_of_the_load(clock: FakeClock) -> None:
    # A change committed while a slow load ran may be missed by it: the copy is as old as the
    # start of that load, not its end.
    def slow() -> float:
        started = clock.now
        clock.advance(3.0)
        return started

    holder = Refreshing("policies", slow, INTERVAL, clock)
    assert holder.get() == 1000.0
    assert holder.age() == pytest.approx(3.0)
    clock.advance(INTERVAL - 3.0 - 0.001)
    assert holder.get() == 1000.0
    clock.advance(0.001)  # 10 s after the first load started (7 s after it ended)
    assert holder.get() == 1010.0


def test_age_is_infinite_before_the_first_load(value: Refreshing[int]) -> None:
    assert value.age() == float("inf")
    assert value.current is None


# --- failures: fail closed past the bound --------------------------------------------------------


def test_a_failing_load_past_the_bound_is_refused_not_answered_from_the_old_copy(
    value: Refreshing[int], load: Loader, clock: FakeClock
) -> None:
    value.get()
    load.failing = True
    clock.advance(INTERVAL)

    with pytest.raises(TemporarilyUnavailableError) as caught:
        value.get()
    assert caught.value.error == "temporarily_unavailable"
    assert caught.value.status_code == 503
    assert "database is down" not in caught.value.description
    assert value.current == 1  # still held, never used to decide


def test_a_failing_load_is_not_retried_on_every_request(
    value: Refreshing[int], load: Loader, clock: FakeClock
) -> None:
    value.get()
    load.failing = True
    clock.advance(INTERVAL)
    for _ in range(50):
        assert unavailable(value)
    assert load.calls == 2  # refused at once, without waiting on the database again

    clock.advance(RETRY_AFTER_FAILURE)
    assert unavailable(value)
    assert load.calls == 3


def test_recovers_once_loading_works_again(
    value: Refreshing[int], load: Loader, clock: FakeClock
) -> None:
    value.get()
    load.failing = True
    clock.advance(INTERVAL)
    assert unavailable(value)

    load.failing = False
    clock.advance(RETRY_AFTER_FAILURE)
    assert value.get() == 3


def test_nothing_loaded_is_refused_at_once_then_retried_after_the_back_off(
    value: Refreshing[int], load: Loader, clock: FakeClock
) -> None:
    load.failing = True
    assert unavailable(value)
    load.failing = False
    calls = load.calls

    assert unavailable(value)
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
    assert value.get() == 2  # the copy loaded at the same instant is within the bound


# --- invalidate -----------------------------------------------------------------------------------


def test_invalidate_forces_a_reload_on_next_use(
    value: Refreshing[int], load: Loader, clock: FakeClock
) -> None:
    value.get()
    value.invalidate()
    assert value.age() == float("inf")
    assert value.get() == 2


def test_invalidated_and_unloadable_is_refused(
    value: Refreshing[int], load: Loader, clock: FakeClock
) -> None:
    # A NOTIFY said the state changed and the database cannot be read: no decision on the copy.
    value.get()
    value.invalidate()
    load.failing = True
    assert unavailable(value)


def test_invalidate_during_a_load_makes_that_load_not_count_as_fresh(clock: FakeClock) -> None:
    # The load under way may have read the table before the change the invalidation announces.
    inside, release = threading.Event(), threading.Event()
    table = Table("old")

    def slow_load() -> str:
        state = table()
        if table.loads == 2:
            inside.set()
            release.wait(5)
        return state

    holder = Refreshing("policies", slow_load, INTERVAL, clock)
    holder.get()
    loader = threading.Thread(target=holder.refresh)
    loader.start()
    assert inside.wait(5)
    table.state = "new"
    holder.invalidate()
    release.set()
    loader.join(5)

    assert holder.current == "old"  # published (never older than before) ...
    assert holder.age() == float("inf")  # ... but not fresh
    assert holder.get() == "new"
    assert table.loads == 3


# --- concurrency ----------------------------------------------------------------------------------


def test_past_the_bound_a_request_waits_for_the_reload_under_way(clock: FakeClock) -> None:
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
    results: list[int] = []
    waiter = threading.Thread(target=lambda: results.append(value.get()))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # not answered from the stale copy
    release.set()
    reloader.join(5)
    waiter.join(5)

    assert results == [2]  # the reload's value, not a load of its own
    assert len(calls) == 2


def test_concurrent_first_requests_wait_for_the_one_load_instead_of_failing() -> None:
    # A fresh worker gets several requests at once: the first loads, the others must wait for
    # that load (bounded), not be refused because "an attempt was made a moment ago".
    started = threading.Event()
    calls: list[int] = []

    def slow_load() -> int:
        calls.append(1)
        started.set()
        time.sleep(0.2)
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


# --- the timer ------------------------------------------------------------------------------------


def test_the_timer_reloads_every_half_interval_so_requests_never_wait() -> None:
    table = Table("v1")
    holder = Refreshing("policies", table, 0.2, time.monotonic)
    holder.get()
    holder.start()
    try:
        time.sleep(0.55)  # about five half-intervals
        table.state = "v2"
        deadline = time.monotonic() + 2
        while holder.current != "v2" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert holder.current == "v2"  # reloaded without any request
        assert table.loads >= 3
        assert holder.age() < 0.2
    finally:
        holder.stop()
    loads = table.loads
    time.sleep(0.25)
    assert table.loads == loads  # stopped


def test_a_failing_timer_load_makes_requests_past_the_bound_refused_at_once() -> None:
    load = Loader()
    holder = Refreshing("policies", load, 0.1, time.monotonic)
    holder.get()
    load.failing = True
    holder.start()
    try:
        deadline = time.monotonic() + 2
        while load.calls < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        calls = load.calls
        assert unavailable(holder)
        assert load.calls == calls  # the timer's failure counts: no load by the request
    finally:
        holder.stop()


# --- hooks ----------------------------------------------------------------------------------------


def test_on_load_sees_the_new_value_before_requests_do(
    value: Refreshing[int], load: Loader, clock: FakeClock
) -> None:
    seen: list[tuple[int, int | None]] = []
    value.on_load = lambda new: seen.append((new, value.current))
    value.get()
    value.refresh()
    assert seen == [(1, None), (2, 1)]


def test_the_start_of_the_load_is_reported_and_an_invalidation_as_none(
    value: Refreshing[int], load: Loader, clock: FakeClock
) -> None:
    reported: list[float] = []
    value.report_loaded_at = reported.append
    value.get()
    clock.advance(INTERVAL)
    value.get()
    value.invalidate()
    assert reported == [1000.0, 1000.0 + INTERVAL, float("-inf")]


def test_a_failing_report_does_not_fail_the_load(value: Refreshing[int]) -> None:
    def broken(_: float) -> None:
        raise OSError("metrics directory gone")

    value.report_loaded_at = broken
    assert value.get() == 1
