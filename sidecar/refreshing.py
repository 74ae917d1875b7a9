"""A value loaded from the database and kept in process for a bounded time.

The bound is a promise to security teams: no decision is made on a copy older than ``interval``
seconds, counted from the start of the load that produced it. A change committed after that start
is the one a copy may miss, so no decision is made on a state older than ``interval`` counted
from the commit of the change. So:

- a timer in each worker (:meth:`Refreshing.start`) reloads the value every ``interval / 2``, so
  that requests normally find a fresh copy and never wait;
- a request that finds the copy past the bound (the timer was late, the process was stopped, the
  database was slow) reloads it before deciding, waiting for a load another thread has under way
  rather than starting its own; it never answers from the old copy while a reload runs behind it;
- when that load fails, the request is refused with ``503 temporarily_unavailable``: a policy
  disabled, or a key retired, while the database was unreachable must not keep granting (fail
  closed). After a failure, loads are retried at most every ``RETRY_AFTER_FAILURE`` seconds;
- :meth:`invalidate` (a PostgreSQL ``NOTIFY``, an admin change in this process) makes the next
  use reload; a load under way when it is called does not count as fresh.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from sidecar.errors import TemporarilyUnavailableError

T = TypeVar("T")
# After a failed load, requests are refused at once for this long (seconds) instead of each
# retrying against a database that just failed.
RETRY_AFTER_FAILURE = 1.0
# A request waits at most this long (seconds) for a load under way.
LOAD_WAIT = 5.0
NEVER = float("-inf")
log = logging.getLogger(__name__)


class Refreshing(Generic[T]):
    def __init__(
        self, name: str, load: Callable[[], T], interval: float, clock: Callable[[], float]
    ) -> None:
        self.name = name
        self._load = load
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()  # held by the one load under way
        # The value and when the load that produced it started, replaced together (one
        # attribute) so that a reader never pairs a value with another load's time.
        self._state: tuple[T | None, float] = (None, NEVER)
        # Guards the generation and the swaps of _state against invalidate().
        self._state_lock = threading.Lock()
        self._failed_at = NEVER
        self._generation = 0
        self._timer: threading.Thread | None = None
        self._stopped = threading.Event()
        # Called with each loaded value before any request can see it (under the load lock).
        self.on_load: Callable[[T], None] | None = None
        # Called with the start time of the load behind the value served (-inf: none, or
        # invalidated) whenever it changes; feeds sidecar_state_age_seconds.
        self.report_loaded_at: Callable[[float], None] | None = None

    @property
    def current(self) -> T | None:
        """The value held now (None before the first load), without loading."""
        return self._state[0]

    def age(self) -> float:
        """Seconds since the start of the load that produced the value held (inf: none)."""
        return self._clock() - self._state[1]

    def invalidate(self) -> None:
        # A load already under way may have read the old state: the generation makes it not
        # count as fresh, so the next get() loads again.
        with self._state_lock:
            self._generation += 1
            self._state = (self._state[0], NEVER)
            self._failed_at = NEVER
            self._report(NEVER)

    def get(self) -> T:
        value, loaded_at = self._state
        if value is not None and self._clock() - loaded_at < self.interval:
            return value
        return self._load_for_request()

    def refresh(self) -> T:
        """Load now, waiting for a load under way; raises on failure."""
        with self._lock:
            return self._load_locked()

    def start(self) -> None:
        """Reload every ``interval / 2`` on a daemon thread of this process (call after fork)."""
        if self._timer is not None and self._timer.is_alive():
            return
        self._stopped.clear()
        self._timer = threading.Thread(target=self._run, name=f"refresh-{self.name}", daemon=True)
        self._timer.start()

    def stop(self) -> None:
        self._stopped.set()
        timer = self._timer
        if timer is not None and timer is not threading.current_thread():
            timer.join(LOAD_WAIT)

    def _run(self) -> None:
        period = max(0.05, self.interval / 2)
        while not self._stopped.wait(period):
            try:
                self.refresh()
            except Exception as exc:
                self._failed_at = self._clock()
                log.warning("%s refresh failed: %s", self.name, type(exc).__name__)

    def _load_for_request(self) -> T:
        started = self._clock()
        if started - self._failed_at < RETRY_AFTER_FAILURE:
            raise TemporarilyUnavailableError(reason=f"{self.name} unavailable")
        if not self._lock.acquire(timeout=LOAD_WAIT):
            raise TemporarilyUnavailableError(reason=f"{self.name} unavailable")
        try:
            value, loaded_at = self._state
            if value is not None and self._clock() - loaded_at < self.interval:
                return value  # another thread loaded it while this one waited
            return self._load_locked()
        except TemporarilyUnavailableError:
            raise
        except Exception as exc:
            self._failed_at = started
            log.warning("%s refresh failed: %s", self.name, type(exc).__name__)
            raise TemporarilyUnavailableError(reason=f"{self.name} unavailable") from exc
        finally:
            self._lock.release()

    def _load_locked(self) -> T:
        with self._state_lock:
            generation = self._generation
        started = self._clock()
        value = self._load()
        if self.on_load is not None:
            # Before the value is published: what is derived from it is ready before any
            # request can decide with it.
            self.on_load(value)
        with self._state_lock:
            fresh = generation == self._generation
            self._state = (value, started if fresh else NEVER)
            if fresh:
                self._failed_at = NEVER
            self._report(self._state[1])
        return value

    def _report(self, loaded_at: float) -> None:
        # Under the state lock, so that the metric follows the order of the swaps.
        if self.report_loaded_at is not None:
            try:
                self.report_loaded_at(loaded_at)
            except Exception as exc:  # a metric never fails a load
                log.warning("%s: reporting its age failed: %s", self.name, type(exc).__name__)
