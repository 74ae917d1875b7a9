"""The gunicorn worker classes of ``deploy/gunicorn.conf.py``, balanced across workers.

- :class:`BalancedAsgiWorker` (the default): gunicorn's asyncio worker, serving the app through
  :class:`sidecar.web.asgi.AsgiBridge` (``/token`` answered on the event loop, no thread hand-off);
- :class:`BalancedThreadWorker`: gunicorn's gthread worker (a thread per request in flight).

Both worker kinds accept a connection whenever its listener is readable. Every worker
waits on the same listening socket and Linux wakes the most recent waiter first, so when a gateway
opens its connection pool at once, one worker accepts every connection and the others stay idle
for as long as those kept-alive connections live (measured: 16 connections to 2 workers went 16
to 0, and the service ran on one core). Here each worker publishes how many connections it holds
in a small table shared by the workers (memory the master maps before it forks them), and accepts
only while no other live worker holds fewer: new connections go to the least loaded worker, and a
worker that holds the fewest always accepts, so no connection waits for a busy one.

asyncio's own accept loop takes up to 100 connections each time the listener is readable, so it
balances even worse; the asyncio worker here accepts one connection at a time, with the same rule.

They override internals of gunicorn 26.2 (gthread's ``wait_for_and_dispatch_events``,
``set_accept_enabled``, ``nr_conns``; the asyncio worker's ``_serve`` and ``_shutdown``), hence the
pinned gunicorn 26.x in pyproject.toml.
"""

from __future__ import annotations

import asyncio
import errno
import multiprocessing
import os
import signal
import socket
import time
from typing import Any

from gunicorn.workers.gasgi import ASGIWorker
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
_used = multiprocessing.RawValue("i", 0)  # slots below this index have been claimed at some time
_claim = multiprocessing.Lock()
# The asyncio worker tells the master it is alive (a file's mtime: a syscall) this often, not on
# every turn of its accept loop; gunicorn's timeout (30 s) is far longer.
HEARTBEAT_INTERVAL = 1.0


def release_slot(pid: int) -> None:
    """Forget a worker: when it starts stopping, and (by the master's child_exit hook) when it
    exited, however it ended."""
    for slot in range(MAX_WORKERS):
        if _pids[slot] == pid:
            _connections[slot] = 0
            _pids[slot] = 0


def claim_slot() -> int | None:
    """A free slot of the shared table for this process; None when every slot is taken (the
    worker then accepts like an unbalanced one)."""
    pid = os.getpid()
    with _claim:
        for slot in range(MAX_WORKERS):
            if _pids[slot] == 0:
                _pids[slot], _connections[slot], _beats[slot] = pid, 0, time.time()
                _used.value = max(_used.value, slot + 1)
                return slot
    return None


def may_accept(slot: int, mine: int, limit: int) -> bool:
    """Publish this worker's connection count; True while no other live worker holds fewer."""
    now = time.time()
    _connections[slot], _beats[slot] = mine, now
    fewest = min(
        (
            _connections[s]
            for s in range(_used.value)
            if _pids[s] and s != slot and now - _beats[s] < STALE_AFTER
        ),
        default=mine,
    )
    return mine < limit and mine <= fewest


def services_of(worker: Any) -> Any:
    """The worker's Services (sidecar.services), or None before its app is loaded."""
    app = getattr(worker, "wsgi", None) or getattr(worker, "asgi", None)
    return getattr(app, "extensions", {}).get("sidecar")


def drain_on_sigterm(worker: Any) -> None:
    """On SIGTERM, mark the app draining before gunicorn's own handler runs: /readyz answers
    503 while gunicorn lets the requests in flight finish (up to graceful_timeout) and accepts
    no new ones."""
    services = services_of(worker)
    if isinstance(worker, ASGIWorker):
        # The asyncio worker's handlers are the event loop's (loop.add_signal_handler).
        def drain_loop() -> None:
            services.draining.set()
            worker.handle_exit_signal()

        worker.loop.add_signal_handler(signal.SIGTERM, drain_loop)
        return
    stop = signal.getsignal(signal.SIGTERM)

    def drain(signum: int, frame: Any) -> None:
        services.draining.set()
        if callable(stop):
            stop(signum, frame)

    signal.signal(signal.SIGTERM, drain)


class BalancedAsgiWorker(ASGIWorker):  # type: ignore[misc]
    """gunicorn's asyncio worker, accepting one connection at a time, only while no other live
    worker holds fewer (see the module docstring)."""

    # uvloop runs a signal's handler only while its loop runs: a signal that arrives while the
    # worker boots (its app loading, before the loop starts) would be lost, and a SIGTERM then
    # waits for the orchestrator's SIGKILL. From the start of the worker process until its loop
    # runs, these signals are recorded here instead, and raised again once it does.
    _BOOT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)

    def init_process(self) -> None:
        self._during_boot: list[int] = []
        self._loop_handlers: dict[int, Any] = {}
        self._hold_signals()  # the master's handlers, inherited, would drop them
        super().init_process()

    def init_signals(self) -> None:
        super().init_signals()
        self._hold_signals()

    def run(self) -> None:
        self._hold_signals()  # post_worker_init set a loop handler (SIGTERM: drain first)
        super().run()

    def _hold_signals(self) -> None:
        for sig in self._BOOT_SIGNALS:
            handler = signal.getsignal(sig)
            if handler != self._record_boot_signal:
                self._loop_handlers[sig] = handler
                signal.signal(sig, self._record_boot_signal)

    def _record_boot_signal(self, signum: int, frame: Any) -> None:
        self._during_boot.append(signum)

    def _replay_boot_signals(self) -> None:
        for sig, handler in self._loop_handlers.items():
            signal.signal(sig, handler)
        for signum in dict.fromkeys(self._during_boot):
            os.kill(os.getpid(), signum)  # now the running loop's handlers see it

    async def _serve(self) -> None:
        from sidecar.web.fastpath import FastTokenProtocol

        self._replay_boot_signals()

        self._protocol = FastTokenProtocol
        self._accepting = False
        self._connecting = 0  # accepted, not yet counted in nr_conns by their protocol
        self._slot: int | None = None
        self._listeners: list[socket.socket] = [listener.sock for listener in self.sockets]
        for listener in self._listeners:
            listener.setblocking(False)
        told_master = 0.0
        try:
            while self.alive:
                now = time.monotonic()
                if now - told_master >= HEARTBEAT_INTERVAL:
                    self.notify()
                    told_master = now
                if self.ppid != os.getppid():
                    self.log.info("Parent changed, shutting down: %s", self)
                    break
                if self._slot is None:
                    # Claimed on the loop's first turn, not while the app loaded: a booting
                    # worker must not look like the least loaded one.
                    self._slot = claim_slot()
                self._set_accepting(self._may_accept())
                await asyncio.sleep(RECHECK_INTERVAL)
        except asyncio.CancelledError:
            pass
        self._set_accepting(False)
        release_slot(os.getpid())
        await self._shutdown()  # waits for the connections in flight (graceful_timeout)

    def _may_accept(self) -> bool:
        mine = self.nr_conns + self._connecting
        if self._slot is None:
            return bool(mine < self.worker_connections)
        return may_accept(self._slot, mine, self.worker_connections)

    def _set_accepting(self, enabled: bool) -> None:
        if enabled == self._accepting:
            return
        for listener in self._listeners:
            if enabled:
                self.loop.add_reader(listener.fileno(), self._accept, listener)
            else:
                self.loop.remove_reader(listener.fileno())
        self._accepting = enabled

    def _accept(self, listener: socket.socket) -> None:
        if not self.alive or not self._may_accept():
            self._set_accepting(False)  # the heartbeat loop looks again in RECHECK_INTERVAL
            return
        try:
            connection, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # another worker took it
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                raise
            self.log.error("accept failed: %s", exc)
            self._set_accepting(False)
            return
        connection.setblocking(False)
        self._connecting += 1
        self.loop.create_task(self._connect(connection))
        self._set_accepting(self._may_accept())

    async def _connect(self, connection: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: self._protocol(self), sock=connection)
        except OSError:
            connection.close()
        finally:
            self._connecting -= 1


class BalancedThreadWorker(ThreadWorker):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slot: int | None = None
        self._claimed = False  # a slot is claimed (or none was free) on the loop's first turn

    def _claim_slot(self) -> None:
        # Claimed when the loop first runs, not while the app loads: a booting worker must not
        # look like the least loaded one that the others leave connections to.
        self._claimed = True
        self.slot = claim_slot()

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        if self.alive and not self._claimed:
            self._claim_slot()
        if self.slot is not None and not self.alive:
            # Stopping (SIGTERM, SIGHUP, max_requests): it accepts nothing more, so it must not
            # count as a worker the others should leave connections to.
            release_slot(os.getpid())
            self.slot = None
        if self.alive and self.slot is not None:
            accepting = may_accept(self.slot, self.nr_conns, self.worker_connections)
            self.set_accept_enabled(accepting)
            if not accepting:
                # Look again soon: another worker's count may rise past this one's at any moment,
                # and the listen queue must not wait for this worker's next event.
                timeout = min(timeout, RECHECK_INTERVAL)
        super().wait_for_and_dispatch_events(timeout)
