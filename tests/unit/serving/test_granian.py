"""The supervisor of ``sidecar serve`` under granian (sidecar/serving/granian.py), in-process and
without granian: its children are stand-ins, short-lived processes forked as the supervisor
forks its servers, that record each signal they receive in a file. Every one of them is killed
at the end of its test."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import Settings, load_settings, settings_from_mapping
from sidecar.serving import common, granian
from sidecar.serving.granian import Listener, Supervisor, serve_granian
from tests.conftest import GATEWAY_SECRET
from tests.functional.http.admin_support import admin_credentials, enable_admin
from tests.loopback import wait_for

CONTEXT = multiprocessing.get_context("fork")  # as the supervisor starts its servers
GRACEFUL_TIMEOUT = 0.5
# Supervisor._stop waits graceful_timeout and this much more before it kills a server.
STOP_MARGIN = 5.0
WAIT = 10.0  # how long a test waits for a stand-in to start or to record a signal


def _stand_in(record: str, exit_on: tuple[str, ...], lifetime: float) -> None:
    """A granian server's stand-in: appends the name of each SIGHUP and SIGTERM it receives to
    ``record``, exits on those in ``exit_on``, and otherwise lives ``lifetime`` seconds."""
    path = Path(record)

    def note(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        with path.open("a") as out:
            out.write(name + "\n")
        if name in exit_on:
            sys.exit(0)

    signal.signal(signal.SIGHUP, note)
    signal.signal(signal.SIGTERM, note)
    with path.open("a") as out:
        out.write("ready\n")
    time.sleep(lifetime)


class StandIn:
    def __init__(self, process: BaseProcess, record: Path) -> None:
        self.process = process
        self.record = record

    def signals(self) -> list[str]:
        """The signals received so far, in order."""
        lines = self.record.read_text().splitlines() if self.record.exists() else []
        return [line for line in lines if line != "ready"]

    def received(self, name: str) -> bool:
        return wait_for(lambda: name in self.signals(), WAIT, interval=0.01)


class StandIns:
    """Starts stand-ins (each ready, its handlers installed, when returned); kills them all."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._started: list[BaseProcess] = []

    def start(
        self, name: str, *, exit_on: tuple[str, ...] = ("SIGTERM",), lifetime: float = 30.0
    ) -> StandIn:
        record = self._directory / f"{name}.signals"
        process = CONTEXT.Process(
            target=_stand_in, args=(str(record), exit_on, lifetime), name=name, daemon=True
        )
        process.start()
        self._started.append(process)
        started = wait_for(
            lambda: record.exists() and "ready" in record.read_text(), WAIT, interval=0.01
        )
        assert started, name
        return StandIn(process, record)

    def kill_all(self) -> None:
        for process in self._started:
            if process.is_alive():
                process.kill()
            process.join(5)


@pytest.fixture
def stand_ins(tmp_path: Path) -> Iterator[StandIns]:
    started = StandIns(tmp_path)
    try:
        yield started
    finally:
        started.kill_all()


@pytest.fixture
def config(config: dict[str, Any]) -> dict[str, Any]:
    config["server"] = {"graceful_timeout": GRACEFUL_TIMEOUT}
    return config


@pytest.fixture
def supervisor(config_file: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Supervisor:
    """A supervisor as run() leaves it before it forks: the snapshot written. Its runtime
    directory is made under tmp_path."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    listeners = [Listener("sidecar.serving.common:gateway_app", "127.0.0.1", 8080, 2)]
    supervising = Supervisor(config_file, load_settings(config_file), listeners)
    supervising._write_snapshot(config_file.read_bytes())
    return supervising


@pytest.fixture
def serving_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="sidecar.serving")
    return caplog


def snapshot_of(supervising: Supervisor) -> Path:
    return supervising._snapshot


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "sidecar.serving" and r.levelno == level
    ]


# --- the snapshot the workers read -------------------------------------------------------------


def test_the_snapshot_is_the_configuration_file_as_written(
    supervisor: Supervisor, config_file: Path
) -> None:
    assert snapshot_of(supervisor).read_bytes() == config_file.read_bytes()


def test_the_snapshot_is_readable_by_its_owner_only_whatever_the_umask(
    supervisor: Supervisor,
) -> None:
    previous = os.umask(0)
    try:
        supervisor._write_snapshot(b"issuer: https://sidecar.test.example\n")
    finally:
        os.umask(previous)

    snapshot = snapshot_of(supervisor)
    assert stat.S_IMODE(snapshot.stat().st_mode) == 0o600
    assert stat.S_IMODE(snapshot.parent.stat().st_mode) == 0o700


def test_a_snapshot_is_replaced_whole_never_rewritten_in_place(supervisor: Supervisor) -> None:
    snapshot = snapshot_of(supervisor)
    old = snapshot.read_bytes()
    new = b"# the new configuration\n" * 1000

    with snapshot.open("rb") as reader:  # a worker that opened the old one meanwhile
        supervisor._write_snapshot(new)
        assert reader.read() == old

    assert snapshot.read_bytes() == new
    assert sorted(p.name for p in snapshot.parent.iterdir()) == ["config.yaml"]  # no partial


# --- SIGHUP: _reload --------------------------------------------------------------------------


def test_a_valid_configuration_is_snapshotted_and_every_server_gets_sighup(
    supervisor: Supervisor,
    stand_ins: StandIns,
    config: dict[str, Any],
    config_file: Path,
    serving_log: pytest.LogCaptureFixture,
) -> None:
    servers = [stand_ins.start("gateway"), stand_ins.start("admin")]
    supervisor._children = [s.process for s in servers]
    config["tokens"]["max_ttl"] = 200
    config_file.write_text(yaml.safe_dump(config))

    supervisor._reload()

    assert snapshot_of(supervisor).read_bytes() == config_file.read_bytes()
    assert all(s.received("SIGHUP") for s in servers)
    assert [s.signals() for s in servers] == [["SIGHUP"], ["SIGHUP"]]
    assert messages(serving_log, logging.INFO) == [
        "SIGHUP: configuration validated; replacing the workers"
    ]


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda c: c["tokens"].update(algorithm="HS256"), "tokens.algorithm"),
        (lambda c: c.update(unknown_key=1), "unknown_key"),
    ],
    ids=["invalid value", "unknown key"],
)
def test_an_invalid_configuration_is_refused_and_the_snapshot_and_servers_stay(
    supervisor: Supervisor,
    stand_ins: StandIns,
    config: dict[str, Any],
    config_file: Path,
    serving_log: pytest.LogCaptureFixture,
    edit: Callable[[dict[str, Any]], None],
    reason: str,
) -> None:
    server = stand_ins.start("gateway")
    supervisor._children = [server.process]
    before = snapshot_of(supervisor).read_bytes()
    edit(config)
    config_file.write_text(yaml.safe_dump(config))

    supervisor._reload()

    [refused] = messages(serving_log, logging.ERROR)
    assert refused.startswith("SIGHUP: configuration refused, the previous one stays: ")
    assert reason in refused
    assert "\n" not in refused
    assert snapshot_of(supervisor).read_bytes() == before
    time.sleep(0.3)  # a signal sent would have been recorded by now
    assert server.signals() == []
    assert server.process.is_alive()


def test_a_configuration_file_gone_is_refused(
    supervisor: Supervisor, config_file: Path, serving_log: pytest.LogCaptureFixture
) -> None:
    before = snapshot_of(supervisor).read_bytes()
    config_file.unlink()

    supervisor._reload()

    [refused] = messages(serving_log, logging.ERROR)
    assert "configuration refused" in refused
    assert snapshot_of(supervisor).read_bytes() == before


def test_the_snapshot_keeps_environment_references_and_never_their_values(
    supervisor: Supervisor,
    config: dict[str, Any],
    config_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    serving_log: pytest.LogCaptureFixture,
) -> None:
    config["clients"][0]["client_secret"] = "${SIDECAR_TEST_GATEWAY_SECRET}"
    config_file.write_text(yaml.safe_dump(config))
    monkeypatch.delenv("SIDECAR_TEST_GATEWAY_SECRET", raising=False)

    supervisor._reload()  # validated with the environment of now: the variable is missing
    after_refusal = snapshot_of(supervisor).read_text()
    monkeypatch.setenv("SIDECAR_TEST_GATEWAY_SECRET", GATEWAY_SECRET)
    supervisor._reload()

    assert "${SIDECAR_TEST_GATEWAY_SECRET}" not in after_refusal
    assert "SIDECAR_TEST_GATEWAY_SECRET is not set" in messages(serving_log, logging.ERROR)[0]
    snapshot = snapshot_of(supervisor).read_text()
    assert "${SIDECAR_TEST_GATEWAY_SECRET}" in snapshot
    assert GATEWAY_SECRET not in snapshot


def test_a_server_that_already_exited_is_not_signalled(
    supervisor: Supervisor, stand_ins: StandIns
) -> None:
    gone = stand_ins.start("admin", lifetime=0)
    gone.process.join(WAIT)
    live = stand_ins.start("gateway")
    supervisor._children = [gone.process, live.process]

    supervisor._reload()

    assert live.received("SIGHUP")
    assert gone.signals() == []


# --- SIGTERM: _stop ---------------------------------------------------------------------------


def test_stop_sends_sigterm_to_every_server_and_returns_the_exit_code(
    supervisor: Supervisor, stand_ins: StandIns
) -> None:
    servers = [stand_ins.start("gateway"), stand_ins.start("admin")]
    supervisor._children = [s.process for s in servers]
    started = time.monotonic()

    code = supervisor._stop(7)

    assert code == 7
    assert time.monotonic() - started < STOP_MARGIN  # no waiting for the deadline once they exited
    assert [s.signals() for s in servers] == [["SIGTERM"], ["SIGTERM"]]
    assert [s.process.exitcode for s in servers] == [0, 0]


class MarginElapsed:
    """The time module granian.py sees, in which the fixed margin that Supervisor._stop adds to
    graceful_timeout has elapsed as soon as the deadline is set: the test waits the graceful
    timeout only."""

    def __init__(self) -> None:
        self._offset = 0.0

    def monotonic(self) -> float:
        now = time.monotonic() + self._offset
        self._offset = STOP_MARGIN
        return now

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(seconds)


def test_stop_kills_a_server_still_running_after_the_deadline(
    supervisor: Supervisor, stand_ins: StandIns, monkeypatch: pytest.MonkeyPatch
) -> None:
    polite = stand_ins.start("gateway")
    stubborn = stand_ins.start("admin", exit_on=())
    supervisor._children = [polite.process, stubborn.process]
    monkeypatch.setattr(granian, "time", MarginElapsed())
    started = time.monotonic()

    supervisor._stop(0)

    waited = time.monotonic() - started
    assert stubborn.signals() == ["SIGTERM"]
    assert stubborn.process.exitcode == -signal.SIGKILL
    assert polite.process.exitcode == 0
    assert GRACEFUL_TIMEOUT * 0.9 <= waited < STOP_MARGIN


# --- the watch loop ---------------------------------------------------------------------------


def test_a_server_that_exits_stops_the_others_and_the_supervisor_exits_1(
    supervisor: Supervisor, stand_ins: StandIns, serving_log: pytest.LogCaptureFixture
) -> None:
    gateway = stand_ins.start("gateway")
    admin = stand_ins.start("admin", lifetime=0)
    supervisor._children = [gateway.process, admin.process]

    code = supervisor._watch()

    assert code == 1
    assert messages(serving_log, logging.ERROR) == ["server admin exited with 0; stopping"]
    assert gateway.signals() == ["SIGTERM"]
    assert not gateway.process.is_alive()


def test_sigterm_to_the_supervisor_stops_every_server_and_exits_0(
    supervisor: Supervisor, stand_ins: StandIns
) -> None:
    servers = [stand_ins.start("gateway"), stand_ins.start("admin")]
    supervisor._children = [s.process for s in servers]
    supervisor._on_stop(signal.SIGTERM, None)

    code = supervisor._watch()

    assert code == 0
    assert [s.signals() for s in servers] == [["SIGTERM"], ["SIGTERM"]]


def test_sighup_to_the_supervisor_reaches_its_servers(
    supervisor: Supervisor, stand_ins: StandIns
) -> None:
    # This server exits on SIGHUP, which ends the watch loop once the reload has reached it.
    server = stand_ins.start("gateway", exit_on=("SIGHUP", "SIGTERM"))
    supervisor._children = [server.process]
    supervisor._on_reload(signal.SIGHUP, None)

    code = supervisor._watch()

    assert code == 1
    assert server.signals() == ["SIGHUP"]
    assert supervisor._reload_requested is False


# --- serve_granian: the listeners ----------------------------------------------------------------


class Started:
    """Stands for the Supervisor class: records what serve_granian would supervise."""

    def __init__(self) -> None:
        self.listeners: list[Listener] | None = None

    def __call__(self, config_path: Path, settings: Settings, listeners: list[Listener]) -> Any:
        self.listeners = listeners
        return self

    def run(self) -> int:
        return 0


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> Started:
    """serve_granian with nothing started: no supervisor, metrics directory or logging set-up."""
    supervisor = Started()
    monkeypatch.setattr(granian, "Supervisor", supervisor)
    monkeypatch.setattr(granian, "share_metrics", lambda: pytest.fail("share_metrics called"))
    monkeypatch.setattr(granian, "configure_logging", lambda kind="auto": None)
    # Nothing binds here: a real server on 8080 or 9000 must not fail these tests.
    monkeypatch.setattr(granian, "address_free", lambda host, port: True)
    return supervisor


def with_admin(config: dict[str, Any], listen: str) -> Settings:
    return settings_from_mapping(enable_admin(config, admin_credentials(), listen), env={})


@pytest.mark.parametrize(
    ("bind", "listen"),
    [(None, "127.0.0.1:8080"), ("0.0.0.0:9000", "127.0.0.1:9000")],
    ids=["default bind", "another host"],
)
def test_serve_granian_refuses_an_admin_listener_on_the_gateway_port(
    started: Started, config: dict[str, Any], config_file: Path, bind: str | None, listen: str
) -> None:
    settings = with_admin(config, listen)
    port = listen.rsplit(":", 1)[1]

    with pytest.raises(SystemExit) as refused:
        serve_granian(config_file, settings, bind=bind, workers=None)

    assert refused.value.code == (
        f"sidecar: error: admin.listen port {port} is also the gateway listener's"
    )
    assert started.listeners is None


def test_serve_granian_runs_the_gateway_and_the_admin_listener(
    started: Started,
    config: dict[str, Any],
    config_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(granian, "share_metrics", lambda: None)
    config["server"]["workers"] = 3
    settings = with_admin(config, "127.0.0.1:9901")

    with pytest.raises(SystemExit) as exited:
        serve_granian(config_file, settings, bind="127.0.0.1:9000", workers=None)

    assert exited.value.code == 0
    assert started.listeners == [
        Listener("sidecar.serving.common:gateway_app", "127.0.0.1", 9000, 3),
        Listener("sidecar.serving.common:admin_app", "127.0.0.1", 9901, 1),
    ]
    for listener in started.listeners:  # granian imports each factory by this name
        module, _, name = listener.target.partition(":")
        assert module == common.__name__
        assert callable(getattr(common, name))


def test_serve_granian_workers_option_overrides_the_configuration(
    started: Started, config: dict[str, Any], config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(granian, "share_metrics", lambda: None)
    config["server"]["workers"] = 3

    with pytest.raises(SystemExit):
        serve_granian(config_file, settings_from_mapping(config, env={}), bind=None, workers=5)

    assert started.listeners == [
        Listener("sidecar.serving.common:gateway_app", "127.0.0.1", 8080, 5)
    ]


# --- a port in use is refused, though granian binds with SO_REUSEPORT ---------------------------


def listening(*, reuse_port: bool) -> socket.socket:
    """A loopback socket listening on a free port, as granian binds (SO_REUSEPORT) or not."""
    sock = socket.socket()
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("reuse_port", [True, False], ids=["granian-like", "plain"])
def test_a_port_another_server_listens_on_is_not_free(reuse_port: bool) -> None:
    with listening(reuse_port=reuse_port) as other:
        port = other.getsockname()[1]
        assert not granian.address_free("127.0.0.1", port)
    assert granian.address_free("127.0.0.1", port)  # closed: free again


def test_serve_refuses_a_port_in_use_before_starting_any_server(
    settings: Settings, tmp_path: Path
) -> None:
    config_file = tmp_path / "sidecar.yaml"
    config_file.write_text("{}")
    with listening(reuse_port=True) as other:
        port = other.getsockname()[1]
        with pytest.raises(SystemExit) as refused:
            serve_granian(config_file, settings, bind=f"127.0.0.1:{port}", workers=1)
    assert str(refused.value) == (
        f"sidecar: error: 127.0.0.1:{port} is already in use (another server listens there)"
    )
