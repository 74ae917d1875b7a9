"""The gunicorn worker class of ``deploy/gunicorn.conf.py``: gthread, balanced across workers.

gunicorn's gthread worker accepts a connection whenever its listener is readable. Every worker
waits on the same listening socket and Linux wakes the most recent waiter first, so when a gateway
opens its connection pool at once, one worker accepts every connection and the others stay idle
for as long as those kept-alive connections live (measured: 16 connections to 2 workers went 16
to 0, and the service ran on one core). Here each worker publishes how many connections it holds
in a small table shared by the workers (memory the master maps before it forks them), and accepts
only while no other live worker holds fewer: new connections go to the least loaded worker, and a
worker that holds the fewest always accepts, so no connection waits for a busy one.

It overrides gthread internals of gunicorn 26.2 (``wait_for_and_dispatch_events``,
``set_accept_enabled``, ``nr_conns``), hence the pinned gunicorn 26.x in pyproject.toml.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

MAX_WORKERS = 256
RECHECK_INTERVAL = 0.005  # seconds, while this worker leaves new connections to the others
# A worker whose loop has not come round for this long (stuck, or stopped) is not waited for.
# The loop comes round at least once a second (gthread's select timeout).
STALE_AFTER = 2.0
# Created when gunicorn imports this class in the master, before it forks any worker: every
# worker, and the master, see the same memory. Slot i: a worker's pid (0: free) and its count.
_pids = multiprocessing.RawArray("i", MAX_WORKERS)
_connections = multiprocessing.RawArray("i", MAX_WORKERS)
_beats = multiprocessing.RawArray("d", MAX_WORKERS)  # when the worker's loop last came round
_claim = multiprocessing.Lock()


def release_slot(pid: int) -> None:
    """Forget a worker: when it starts stopping, and (by the master's child_exit hook) when it
    exited, however it ended."""
    for slot in range(MAX_WORKERS):
        if _pids[slot] == pid:
            _connections[slot] = 0
            _pids[slot] = 0


class BalancedThreadWorker(ThreadWorker):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slot: int | None = None
        self._claimed = False  # a slot is claimed (or none was free) on the loop's first turn

    def _claim_slot(self) -> None:
        # Claimed when the loop first runs, not while the app loads: a booting worker must not
        # look like the least loaded one that the others leave connections to.
        self._claimed = True
        pid = os.getpid()
        with _claim:
            for slot in range(MAX_WORKERS):
                if _pids[slot] == 0:
                    _pids[slot], _connections[slot], _beats[slot] = pid, 0, time.time()
                    self.slot = slot
                    return
        # No free slot (more workers than MAX_WORKERS): it accepts like plain gthread.

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        if self.alive and not self._claimed:
            self._claim_slot()
        if self.slot is not None and not self.alive:
            # Stopping (SIGTERM, SIGHUP, max_requests): it accepts nothing more, so it must not
            # count as a worker the others should leave connections to.
            release_slot(os.getpid())
            self.slot = None
        if self.alive and self.slot is not None:
            mine = self.nr_conns
            now = time.time()
            _connections[self.slot], _beats[self.slot] = mine, now
            fewest = min(
                (
                    _connections[s]
                    for s in range(MAX_WORKERS)
                    if _pids[s] and s != self.slot and now - _beats[s] < STALE_AFTER
                ),
                default=mine,
            )
            accepting = mine < self.worker_connections and mine <= fewest
            self.set_accept_enabled(accepting)
            if not accepting:
                # Look again soon: another worker's count may rise past this one's at any moment,
                # and the listen queue must not wait for this worker's next event.
                timeout = min(timeout, RECHECK_INTERVAL)
        super().wait_for_and_dispatch_events(timeout)
