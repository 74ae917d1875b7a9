"""A value loaded from the database and kept in process for a bounded time.

Every worker re-reads at most once per ``interval``, so a change reaches every worker of every
replica within ``interval`` (plus one load) with no per-request query. One request refreshes at a
time; the others keep the previous value. On the event loop (see :mod:`sidecar.blocking`) the
request does not wait for that load either: a thread of its own reloads the value. If a refresh
fails, the previous value is kept (the database being down must not take signing keys or
policies away); with no value at all the request is refused with 503.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from sidecar.blocking import may_block, on_event_loop_thread
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
        self._reloader: threading.Thread | None = None

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
        if value is not None:
            if not self._lock.acquire(False):
                return value  # another thread is loading it: never wait for that
            if on_event_loop_thread():
                # The event loop never waits for the database: the stale value serves every
                # request while a thread of its own reloads it.
                self._reloader = threading.Thread(
                    target=self._reload, args=(now,), name=f"refresh-{self._name}", daemon=True
                )
                self._reloader.start()
                return value
            self._reload(now)  # on a request thread: this one request reloads (releases)
            return self._available(self._value)
        # Nothing held yet: the request waits (bounded) for the first load.
        may_block()
        if not self._lock.acquire(timeout=5):
            return self._available(self._value)
        if self._value is None:
            self._reload(now)  # releases the lock
        else:
            self._lock.release()  # another thread loaded it while this one waited
        return self._available(self._value)

    def join_reload(self, timeout: float = 10.0) -> None:
        """Wait (bounded) for a reload started by :meth:`get`, if one is under way."""
        reloader = self._reloader
        if reloader is not None:
            reloader.join(timeout)

    def _reload(self, started: float) -> None:
        """Load, with the lock held by the caller; releases it."""
        try:
            if self._value is not None and self._clock() - self._loaded_at < self._interval:
                return  # loaded meanwhile (refresh())
            generation = self._generation
            value = self._load()
            self._value = value
            self._loaded_at = self._clock() if generation == self._generation else float("-inf")
        except Exception as exc:
            self._failed_at = started
            log.warning("%s refresh failed: %s", self._name, type(exc).__name__)
        finally:
            self._lock.release()

    def _available(self, value: T | None) -> T:
        if value is None:
            raise TemporarilyUnavailableError(reason=f"{self._name} unavailable")
        return value
