"""The one way tests (and ``bench/``) start ``sidecar serve``: the real command, as a user runs
it, in a process group of its own on a loopback port, stopped by the caller.

Every process started here is remembered; the session-end check in ``tests/conftest.py`` fails
the run if one is still alive (and kills it)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from tests.loopback import kill_tree

_SCRIPT = Path(sys.executable).parent / "sidecar"
SIDECAR = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "sidecar"]
START_TIMEOUT = 45.0
STARTED: list[subprocess.Popen[bytes]] = []


class ServerFailed(Exception):
    """``sidecar serve`` exited, or did not become ready, while it was awaited."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Served:
    """A running ``sidecar serve``."""

    process: subprocess.Popen[bytes]
    url: str
    port: int
    config: dict[str, Any]
    config_file: Path
    output: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    @property
    def database_url(self) -> str:
        return str(self.config["database_url"])

    def log(self) -> str:
        return self.output.read_text(errors="replace")

    def rewrite_config(self, edit: Callable[[dict[str, Any]], None]) -> None:
        """Edit the configuration file in place (for SIGHUP tests)."""
        edit(self.config)
        self.config_file.write_text(yaml.safe_dump(self.config))

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 40) -> int:
        """SIGTERM, as Kubernetes sends it; the exit status."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """Every process of the server's group, whatever state it is in; returns once the
        group is gone (workers orphaned by the kill are reaped by init a moment later)."""
        kill_tree(self.process)
        if self.process.poll() is None:
            self.process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _group_alive(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.02)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerFailed(
                    f"sidecar serve exited with {self.process.returncode}:\n{self.log()}"
                )
            try:
                if (
                    requests.get(f"{self.url}/readyz", timeout=2).status_code == 200
                    and self._admin_ready()
                    and self._workers_started()
                ):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise ServerFailed(f"sidecar serve not ready after {timeout}s:\n{self.log()}")

    def _workers_started(self) -> bool:
        """Every worker of the gateway's listener has started, not just the one that answered:
        a worker still booting when SIGTERM comes may miss it (granian 2.8), and the server
        then takes its whole graceful_timeout to stop."""
        workers = self.extra.get("workers")
        if not workers:
            return True
        log = self.log()
        if "Starting granian" in log:  # the gateway's is the only server with several workers
            return f"Started worker-{workers}" in log
        return log.count("Booting worker with pid") >= workers  # gunicorn

    def _admin_ready(self) -> bool:
        """The admin API's and the management listener, when configured, answer too: each is
        served by a server of its own, which may start after the gateway's."""
        admin = (self.config.get("admin") or {}).get("listen")
        if (
            admin
            and requests.get(f"http://{admin}/admin/openapi.json", timeout=2).status_code != 200
        ):
            return False
        management = (self.config.get("management") or {}).get("listen")
        return not management or (
            requests.get(f"http://{management}/healthz", timeout=2).status_code == 200
        )


def start_serve(
    directory: Path,
    config: dict[str, Any],
    *extra_args: str,
    workers: int = 2,
    env: dict[str, str] | None = None,
    wait: bool = True,
    port: int | None = None,
) -> Served:
    """``sidecar --config DIR/sidecar.yaml serve --bind 127.0.0.1:PORT --workers N`` with the
    server's default settings (those of ``config``, else the product's defaults)."""
    config_file = directory / "sidecar.yaml"
    config_file.write_text(yaml.safe_dump(config))
    port = port or free_port()
    output = directory / f"serve-{port}.log"
    environment = {k: v for k, v in os.environ.items() if k != "SIDECAR_CONFIG"}
    environment.update(env or {})
    command = [
        *SIDECAR,
        "--config",
        str(config_file),
        "serve",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        *extra_args,
    ]
    with output.open("wb") as sink:
        process = subprocess.Popen(
            command,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=environment,
            cwd=directory,
            start_new_session=True,  # kill() takes the whole tree
        )
    STARTED.append(process)
    served = Served(process, f"http://127.0.0.1:{port}", port, config, config_file, output)
    served.extra["workers"] = workers
    if wait:
        try:
            served.wait_ready()
        except BaseException:
            served.kill()
            raise
    return served


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def still_running() -> list[subprocess.Popen[bytes]]:
    """Started processes (or members of their process groups) still alive."""
    return [p for p in STARTED if p.poll() is None or _group_alive(p.pid)]
