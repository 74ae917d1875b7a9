"""The gunicorn worker classes (sidecar/worker.py): new connections go to the worker that holds
the fewest. The real server runs the default, BalancedAsgiWorker; the shared table and
BalancedThreadWorker's accept rule are tested in probe workers.

Through the real server (`sidecar serve --workers 2`): keep-alive connections opened together,
then which worker holds each one, read from /proc (the sockets each worker process has open,
matched to the ESTABLISHED connections of /proc/net/tcp on the server's port). And the shared slot
table itself, claimed by real forked processes."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

if not (sys.platform.startswith("linux") and Path("/proc/net/tcp").exists()):
    pytest.skip(
        "needs Linux /proc (/proc/<pid>/fd and /proc/net/tcp) to see which worker holds which "
        "connection",
        allow_module_level=True,
    )

from gunicorn.config import Config
from gunicorn.workers.gthread import ThreadWorker

from sidecar import worker as balanced
from sidecar.worker import MAX_WORKERS, BalancedThreadWorker, release_slot
from tests.test_server import Gunicorn, start_gunicorn

CONNECTIONS = 8
ANSWER_TIMEOUT = 10.0


# --- the server ---------------------------------------------------------------------------------


def start_server(directory: Path) -> Gunicorn:
    """`sidecar serve --workers 2` with the default gunicorn settings (no access log)."""
    return start_gunicorn(directory, access_log=False)


# --- which worker holds which connection ----------------------------------------------------------


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (gunicorn's workers, for the master)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after it.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def socket_inodes(pid: int) -> set[int]:
    inodes: set[int] = set()
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for descriptor in descriptors:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{descriptor}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def established_inodes(local_port: int) -> set[int]:
    """Inodes of the ESTABLISHED TCP sockets whose local port is ``local_port``: the server side
    of the connections to it (a client side has the port as its remote one)."""
    inodes: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == local_port and inode:
                inodes.add(inode)
    return inodes


def port_of(server: Gunicorn) -> int:
    return int(server.url.rsplit(":", 1)[1])


def held_by_worker(server: Gunicorn) -> dict[int, int]:
    """Each worker's pid: how many established connections to the server port it holds."""
    established = established_inodes(port_of(server))
    return {pid: len(socket_inodes(pid) & established) for pid in children(server.process.pid)}


def wait_for_held(server: Gunicorn, total: int, timeout: float = 5.0) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    held = held_by_worker(server)
    while sum(held.values()) != total and time.monotonic() < deadline:
        time.sleep(0.05)
        held = held_by_worker(server)
    return held


# --- keep-alive clients -----------------------------------------------------------------------


def healthz(connection: socket.socket) -> None:
    """GET /healthz on a kept-alive connection, the whole answer read."""
    connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: sidecar.test\r\n\r\n")
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = connection.recv(4096)
        if not chunk:
            raise ConnectionError("closed by the server before answering")
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"connection: close" not in head.lower(), head  # kept alive
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = connection.recv(4096)
        if not chunk:
            raise ConnectionError("closed by the server mid-answer")
        body += chunk


def open_answered(server: Gunicorn, timeout: float = ANSWER_TIMEOUT) -> tuple[socket.socket, float]:
    """A new connection with one request answered on it, kept open; how long the answer took."""
    connection = socket.create_connection(("127.0.0.1", port_of(server)), timeout=timeout)
    started = time.monotonic()
    try:
        healthz(connection)
    except BaseException:
        connection.close()
        raise
    return connection, time.monotonic() - started


def open_together(server: Gunicorn, count: int) -> tuple[list[socket.socket], list[float]]:
    """``count`` connections opened at the same moment (a gateway filling its pool), each
    answered once and kept open; the time each answer took."""
    barrier = threading.Barrier(count)
    opened: list[tuple[socket.socket, float]] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def client() -> None:
        try:
            barrier.wait(timeout=5)
            result = open_answered(server)
        except BaseException as exc:
            with lock:
                failures.append(exc)
            return
        with lock:
            opened.append(result)

    threads = [threading.Thread(target=client) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(ANSWER_TIMEOUT + 5)
    connections = [connection for connection, _ in opened]
    if failures:
        close_all(connections)
        raise failures[0]
    return connections, [took for _, took in opened]


def close_all(connections: list[socket.socket]) -> None:
    for connection in connections:
        connection.close()


def both_workers_serving(server: Gunicorn, timeout: float = 15) -> None:
    """Wait until both workers run their loops: a worker takes no connection while it loads the
    app, so until then the other one takes them all."""
    deadline = time.monotonic() + timeout
    while True:
        connections = [open_answered(server)[0] for _ in range(2)]
        held = wait_for_held(server, 2)
        close_all(connections)
        wait_for_held(server, 0)
        if sorted(held.values()) == [1, 1]:
            return
        assert time.monotonic() < deadline, held
        time.sleep(0.1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    """`sidecar serve --workers 2` with the default gunicorn settings (the balanced worker)."""
    started = start_server(tmp_path_factory.mktemp("worker"))
    try:
        both_workers_serving(started)
        yield started
    finally:
        started.kill()


@pytest.fixture
def idle_server(server: Gunicorn) -> Gunicorn:
    """The shared server with no connection left over from an earlier test."""
    held = wait_for_held(server, 0)
    assert sum(held.values()) == 0, held
    return server


# --- through the real server --------------------------------------------------------------------


def test_the_default_worker_class_is_the_balanced_one(idle_server: Gunicorn) -> None:
    assert "Using worker: sidecar.worker.BalancedAsgiWorker" in idle_server.log()
    assert len(children(idle_server.process.pid)) == 2


def test_connections_opened_together_are_spread_over_both_workers(idle_server: Gunicorn) -> None:
    connections, _ = open_together(idle_server, CONNECTIONS)
    try:
        held = wait_for_held(idle_server, CONNECTIONS)

        assert sum(held.values()) == CONNECTIONS, held
        assert len(held) == 2, held
        # Plain gthread: one worker accepts all 8 (the kernel wakes the last waiter first).
        assert all(count > 0 for count in held.values()), held
        assert max(held.values()) <= 5, held
    finally:
        close_all(connections)


def test_connections_opened_one_by_one_are_shared_evenly(idle_server: Gunicorn) -> None:
    connections: list[socket.socket] = []
    try:
        for _ in range(4):
            connection, _ = open_answered(idle_server)
            connections.append(connection)
        held = wait_for_held(idle_server, 4)

        assert sorted(held.values()) == [2, 2], held
    finally:
        close_all(connections)


def test_no_connection_waits_for_a_worker_to_wake_up(idle_server: Gunicorn) -> None:
    connections, took = open_together(idle_server, CONNECTIONS)
    close_all(connections)

    assert max(took) < 0.5, sorted(round(t, 3) for t in took)


def test_new_workers_accept_while_old_ones_drain_after_a_reload(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    connections: list[socket.socket] = []
    try:
        both_workers_serving(server)
        # Kept alive: the old workers drain them for up to keepalive (15 s).
        connections = [open_answered(server)[0] for _ in range(4)]
        old = wait_for_held(server, 4)
        assert sorted(old.values()) == [2, 2], old

        server.process.send_signal(signal.SIGHUP)  # new workers, then SIGTERM to the old ones
        deadline = time.monotonic() + 15
        while len(set(children(server.process.pid)) - set(old)) < 2:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        while True:  # a new worker has loaded the app (the old ones accept no more)
            try:
                if requests.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        time.sleep(0.3)  # and so has the other one, started at the same time

        # Enough for both new workers to pass any frozen count: with the bug, the last are never
        # accepted (each new worker takes connections up to one more than the fewest old count).
        for n in range(2 * max(old.values()) + 3):
            try:
                connections.append(open_answered(server, timeout=2)[0])
            except TimeoutError:
                pytest.fail(
                    f"new connection {n + 1} not answered within 2 s: held {held_by_worker(server)}"
                    f", old workers {sorted(old)}"
                )
        held = held_by_worker(server)
        assert all(held.get(pid, 0) == old[pid] for pid in old), held  # the old ones accept none
    finally:
        close_all(connections)
        server.kill()


# --- the shared slot table ----------------------------------------------------------------------


class _WithoutRunLoop(ThreadWorker):  # type: ignore[misc]
    """gunicorn's worker start-up without its run loop (signals, app loading, serving): just the
    selector that gthread's init_process creates, so BalancedThreadWorker's slot claim (on its
    loop's first turn) and its accept decision run for real."""

    def init_process(self) -> None:
        self.poller = selectors.DefaultSelector()


class ProbeWorker(BalancedThreadWorker, _WithoutRunLoop):
    pass


def make_worker(listener: socket.socket, worker_connections: int = 1000) -> ProbeWorker:
    config = Config()
    config.set("worker_connections", worker_connections)
    config.set("threads", 4)
    worker = ProbeWorker(0, os.getpid(), [listener], None, 30, config, None)
    return worker


def slots_of(pid: int) -> list[int]:
    return [slot for slot in range(MAX_WORKERS) if balanced._pids[slot] == pid]


def accepting(worker: ProbeWorker, listener: socket.socket) -> bool:
    return any(key.fileobj is listener for key in worker.poller.get_map().values())


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock
    sock.close()


@pytest.fixture
def clean_table() -> Iterator[None]:
    """This process's copy of the table starts and ends empty (no other test uses it)."""
    assert not any(balanced._pids[slot] for slot in range(MAX_WORKERS))
    yield
    for slot in range(MAX_WORKERS):
        balanced._pids[slot] = 0
        balanced._connections[slot] = 0
        balanced._beats[slot] = 0.0


def claim_in_child(listener: socket.socket) -> int:
    """Fork a process that claims a slot as a worker does at start-up, then exits; its pid."""
    worker = make_worker(listener)  # built before the fork, as gunicorn's master does
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            worker.init_process()
            assert worker.slot is None  # loading the app: not in the table yet
            worker.wait_for_and_dispatch_events(0)  # the loop's first turn claims the slot
            status = 0 if worker.slot is not None else 1
        finally:
            os._exit(status)
    worker.tmp.close()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return pid


@pytest.mark.usefixtures("clean_table")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() of a multi-threaded process
def test_each_worker_process_claims_its_own_slot_in_the_shared_table(
    listener: socket.socket,
) -> None:
    pids = [claim_in_child(listener) for _ in range(3)]

    # Claimed in the children, seen here: the table is memory shared across the fork.
    claimed = [slots_of(pid) for pid in pids]
    assert all(len(slots) == 1 for slots in claimed), claimed
    assert len({slots[0] for slots in claimed}) == 3
    assert all(balanced._connections[slots[0]] == 0 for slots in claimed)


@pytest.mark.usefixtures("clean_table")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_release_slot_frees_only_that_workers_slot_for_the_next_one(
    listener: socket.socket,
) -> None:
    first, second = claim_in_child(listener), claim_in_child(listener)
    [freed] = slots_of(first)
    balanced._connections[freed] = 7  # its last published count

    release_slot(first)

    assert slots_of(first) == []
    assert balanced._pids[freed] == 0
    assert balanced._connections[freed] == 0
    assert len(slots_of(second)) == 1  # the other worker keeps its slot
    release_slot(first)  # again, or for a pid never seen: nothing happens
    release_slot(2**31 - 1)
    assert len(slots_of(second)) == 1
    third = claim_in_child(listener)
    assert slots_of(third) == [freed]  # the first free slot is reused


@pytest.mark.usefixtures("clean_table")
def test_a_worker_accepts_only_while_no_other_holds_fewer(listener: socket.socket) -> None:
    worker = make_worker(listener, worker_connections=10)
    try:
        worker.init_process()
        worker.wait_for_and_dispatch_events(0)
        assert worker.slot is not None
        assert slots_of(os.getpid()) == [worker.slot]

        def decide(mine: int, others: dict[int, int]) -> bool:
            """Publish ``others`` (slot: count) as the other workers would, hold ``mine``."""
            for slot, count in others.items():
                balanced._pids[slot], balanced._connections[slot] = 10_000 + slot, count
                balanced._beats[slot] = time.time()  # a live worker's loop came round just now
            worker.nr_conns = mine
            worker.wait_for_and_dispatch_events(0)
            assert balanced._connections[worker.slot] == mine  # published for the others
            return accepting(worker, listener)

        other = worker.slot + 1
        assert decide(3, {})  # alone: always
        assert not decide(1, {other: 0})  # another holds fewer: it gets the next connection
        assert decide(1, {other: 1})  # a tie: both accept
        assert decide(1, {other: 2})
        assert not decide(3, {other: 2, other + 1: 5})  # the fewest among all others counts
        assert decide(2, {other: 2, other + 1: 5})
        assert not decide(10, {other: 20})  # full (worker_connections), fewest or not
        release_slot(10_000 + other)
        assert decide(3, {other + 1: 5})  # a released slot no longer counts
        balanced._pids[other], balanced._connections[other] = 10_000 + other, 0
        balanced._beats[other] = time.time() - 10  # its loop has not come round for 10 s
        worker.nr_conns = 3
        worker.wait_for_and_dispatch_events(0)
        assert accepting(worker, listener)  # a stuck worker is not waited for
    finally:
        worker.poller.close()
        worker.tmp.close()
