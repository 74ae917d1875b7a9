"""A value loaded from the database and kept in process for a bounded time.

Every worker re-reads at most once per ``interval``, so a change reaches every worker of every
replica within ``interval`` (plus one load) with no per-request query. One request refreshes at a
time; the others keep the previous value. If a refresh fails, the previous value is kept (the
database being down must not take signing keys or policies away); with no value at all the
request is refused with 503.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from sidecar.errors import TemporarilyUnavailableError

T = TypeVar("T")
# After a failed load, the next attempt waits this long (seconds); requests meanwhile use the
# previous value, or get a 503 at once when there is none.
RETRY_AFTER_FAILURE = 1.0
log = logging.getLogger(__name__)


class Refreshing(Generic[T]):
    def __init__(
        self, name: str, load: Callable[[], T], interval: float, clock: Callable[[], float]
    ) -> None:
        self._name = name
        self._load = load
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._value: T | None = None
        self._loaded_at = float("-inf")
        self._failed_at = float("-inf")
        self._generation = 0

    @property
    def current(self) -> T | None:
        """The value held now (None before the first load), without loading."""
        return self._value

    def invalidate(self) -> None:
        # A load already under way read the old state: the generation makes it not count as
        # fresh, so the next get() loads again.
        self._generation += 1
        self._loaded_at = self._failed_at = float("-inf")

    def refresh(self) -> T:
        """Load now (waiting for a refresh in progress); raises on failure."""
        with self._lock:
            value = self._load()
            self._value, self._loaded_at = value, self._clock()
            return value

    def get(self) -> T:
        now = self._clock()
        value = self._value
        if value is not None and now - self._loaded_at < self._interval:
            return value
        if now - self._failed_at < RETRY_AFTER_FAILURE:
            # A load failed a moment ago: do not retry on every request.
            return self._available(value)
        # With a value to fall back on, never wait for another thread's load; with none, wait
        # a bounded time. (A timeout may only be given to a blocking acquire.)
        acquired = self._lock.acquire(timeout=5) if value is None else self._lock.acquire(False)
        if not acquired:
            return self._available(self._value)
        try:
            if self._value is not None and self._clock() - self._loaded_at < self._interval:
                return self._value  # another thread loaded it while this one waited
            generation = self._generation
            value = self._load()
            self._value = value
            self._loaded_at = self._clock() if generation == self._generation else float("-inf")
        except Exception as exc:
            self._failed_at = now
            log.warning("%s refresh failed: %s", self._name, type(exc).__name__)
        finally:
            self._lock.release()
        return self._available(self._value)

    def _available(self, value: T | None) -> T:
        if value is None:
            raise TemporarilyUnavailableError(reason=f"{self._name} unavailable")
        return value
