"""Starting, watching and stopping the servers under test, on 127.0.0.1 only.

Each server (the baseline under gunicorn; the service under gunicorn or granian) is a master
process started here as a child in its own session. Its workers are the Python processes below
it (gunicorn's are its children, granian's too, but any depth counts), less multiprocessing's
helper processes. :meth:`Server.stop` always ends the master and everything that was below it.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.fixtures import Fixtures

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
_SCRIPT = Path(sys.executable).parent / "sidecar"
SIDECAR = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "sidecar"]
# Variables of the caller that would point the service at another configuration or metrics dir,
# or turn gunicorn's access log on.
_DROPPED_ENV = ("SIDECAR_CONFIG", "PROMETHEUS_MULTIPROC_DIR", "SIDECAR_ACCESS_LOG")
# Python processes below a master that are not workers (multiprocessing's own helpers).
_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
# granian: the default server of `sidecar serve`; gunicorn: the supported alternative (its
# gthread worker, sidecar/serving/gunicorn_conf.py), with the product's default settings.
SERVICE_SERVERS = ("granian", "gunicorn")
CACHES = ("subject_tokens", "minted_tokens")
_CACHE_LOOKUP = re.compile(
    r'^sidecar_cache_lookups_total\{(?=[^}]*cache="(\w+)")(?=[^}]*result="(\w+)")[^}]*\}'
    r"\s+(\S+)",
    re.MULTILINE,
)


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
    environment.update(extra or {})
    return environment


def run_sidecar(fixtures: Fixtures, *arguments: str) -> None:
    """A `sidecar` command on the benchmark's configuration; raises with its output on failure."""
    command = [*SIDECAR, "--config", str(fixtures.service_config), *arguments]
    result = subprocess.run(
        command,
        cwd=fixtures.directory,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        raise ServerError(f"`sidecar {' '.join(arguments)}` failed:\n{result.stderr}")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces and ')')."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot): with the pid, an identity that a
    reused pid does not share."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def descendants_of(pid: int) -> list[int]:
    """The live processes below ``pid``: its children, their children, and so on."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        fields = _stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if fields:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, pending = [], [pid]
    while pending:
        below = children.get(pending.pop(), [])
        found.extend(below)
        pending.extend(below)
    return sorted(found)


def _is_worker(pid: int) -> bool:
    """A Python process that is not one of multiprocessing's helpers."""
    try:
        executable = Path(os.readlink(f"/proc/{pid}/exe")).name
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, UnicodeDecodeError):
        return False
    return executable.startswith("python") and not any(h in command for h in _HELPERS)


def workers_of(pid: int) -> list[int]:
    """The worker processes of a master: the Python processes below it with none below them
    (at any depth: `sidecar serve` supervises a granian master whose children are the workers;
    gunicorn's workers are its children), less multiprocessing's helper processes."""
    pythons = [child for child in descendants_of(pid) if _is_worker(child)]
    return [child for child in pythons if not any(_is_worker(g) for g in descendants_of(child))]


def parse_cache_lookups(metrics: str) -> dict[str, dict[str, int]]:
    """``sidecar_cache_lookups_total`` of a Prometheus text exposition (the service sums it over
    its workers): {cache: {"hit": n, "miss": n}}, zeros for what is not there (a disabled cache)."""
    found = {cache: {"hit": 0, "miss": 0} for cache in CACHES}
    for cache, result, value in _CACHE_LOOKUP.findall(metrics):
        found.setdefault(cache, {}).setdefault(result, 0)
        found[cache][result] += int(float(value))
    return found


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM (the peak resident set size) of a process, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Server:
    def __init__(
        self,
        name: str,
        command: Sequence[str],
        *,
        port: int,
        ready_path: str,
        log: Path,
        cwd: Path,
        env: dict[str, str],
    ) -> None:
        self.name = name
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self._ready_path = ready_path
        self._log = log
        self.worker_pids: list[int] = []
        self._descendants: dict[int, int] = {}  # pid -> start time
        with log.open("wb") as sink:
            self.process = subprocess.Popen(
                list(command),
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                # Its own session: a Ctrl-C of the benchmark reaches only us, and we stop it.
                start_new_session=True,
            )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _ready(self) -> bool:
        connection = http.client.HTTPConnection(HOST, self.port, timeout=2)
        try:
            connection.request("GET", self._ready_path)
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()

    def wait_ready(self, workers: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(
                    f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            if self._ready():
                self.worker_pids = workers_of(self.process.pid)
                if len(self.worker_pids) >= workers:
                    self._remember_descendants()
                    return
            time.sleep(0.1)
        raise ServerError(f"{self.name} not ready after {START_TIMEOUT:.0f}s:\n{self.log_tail()}")

    def peak_rss_per_worker_mib(self) -> list[float]:
        # The workers alive now: a worker that died and was replaced would show here.
        self.worker_pids = workers_of(self.process.pid) or self.worker_pids
        peaks = (peak_rss_kib(pid) for pid in self.worker_pids)
        return [round(kib / 1024, 1) for kib in peaks if kib is not None]

    def get(self, path: str) -> bytes:
        """The body of a GET on the server; raises :class:`ServerError` unless it answers 200."""
        connection = http.client.HTTPConnection(HOST, self.port, timeout=10)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise ServerError(f"{self.name}: GET {path} failed: {exc}") from exc
        finally:
            connection.close()
        if response.status != 200:
            raise ServerError(f"{self.name}: GET {path} answered {response.status}")
        return body

    def cache_lookups(self) -> dict[str, dict[str, int]]:
        """The service's cache lookups so far, from its /metrics (see parse_cache_lookups)."""
        return parse_cache_lookups(self.get("/metrics").decode())

    def _remember_descendants(self) -> None:
        if self.process.poll() is None:
            for pid in descendants_of(self.process.pid):
                if (started := start_time(pid)) is not None:
                    self._descendants[pid] = started

    def stop(self) -> None:
        """SIGTERM (gunicorn's and granian's graceful stop), then SIGKILL for whatever is left
        of it."""
        self._remember_descendants()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        for pid, started in self._descendants.items():
            # A process the master left behind: the same pid *and* start time, so never a
            # process that merely reused the pid.
            if start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def start_baseline(fixtures: Fixtures, workers: int) -> Server:
    port = free_port()
    command = [
        sys.executable, "-m", "gunicorn",
        "--workers", str(workers),
        "--worker-class", "sync",
        "--bind", f"{HOST}:{port}",
        "--no-control-socket",
        "--pythonpath", str(REPO_ROOT),
        "bench.baseline_app:create_app()",
    ]  # fmt: skip
    server = Server(
        "baseline",
        command,
        port=port,
        ready_path="/healthz",
        log=fixtures.directory / "baseline.log",
        cwd=fixtures.directory,
        env=_environment(fixtures.baseline_env),
    )
    try:
        server.wait_ready(workers)
    except BaseException:
        server.stop()
        raise
    return server


def start_service(
    fixtures: Fixtures, workers: int, *, server: str = "granian", cached: bool = True
) -> Server:
    """`sidecar serve`, as a user would run it: under granian (the default) or gunicorn, with
    the server settings as shipped; with the caches as configured by default, or both
    disabled."""
    if server not in SERVICE_SERVERS:
        raise ValueError(f"unknown server {server!r}")
    port = free_port()
    config = fixtures.service_config if cached else fixtures.uncached_config
    path = "cached" if cached else "uncached"
    command = [
        *SIDECAR, "--config", str(config),
        "serve", "--bind", f"{HOST}:{port}", "--workers", str(workers),
    ]  # fmt: skip
    command += ["--server", server]
    service = Server(
        f"{server} ({path})",
        command,
        port=port,
        ready_path="/readyz",
        log=fixtures.directory / f"service-{server}-{path}.log",
        cwd=fixtures.directory,
        env=_environment(),
    )
    try:
        service.wait_ready(workers)
    except BaseException:
        service.stop()
        raise
    return service
