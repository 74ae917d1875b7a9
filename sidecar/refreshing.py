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
        self._attempted_at = float("-inf")

    def invalidate(self) -> None:
        self._loaded_at = self._attempted_at = float("-inf")

    def refresh(self) -> T:
        """Load now (waiting for a refresh in progress); raises on failure."""
        with self._lock:
            self._attempted_at = self._clock()
            value = self._load()
            self._value, self._loaded_at = value, self._clock()
            return value

    def get(self) -> T:
        now = self._clock()
        value = self._value
        if value is not None and now - self._loaded_at < self._interval:
            return value
        if value is not None and now - self._attempted_at < 1.0:
            return value  # a recent attempt failed: do not retry on every request
        if self._lock.acquire(blocking=value is None, timeout=5):
            try:
                self._attempted_at = now
                self._value, self._loaded_at = self._load(), self._clock()
            except Exception as exc:
                log.warning("%s refresh failed: %s", self._name, type(exc).__name__)
            finally:
                self._lock.release()
        if self._value is None:
            raise TemporarilyUnavailableError(reason=f"{self._name} unavailable")
        return self._value
