"""``sidecar serve``: the app under a production HTTP server.

The default server is granian: HTTP/1.1 framing (pipelining, ``Content-Length`` and chunked
bodies, ``HEAD``, header limits) by hyper, in Rust, and a WSGI interface that runs the app on a
few Python threads per worker. It was chosen on the attack table of
``tests/functional/test_http_safety.py`` and ``make bench`` (docs/performance.md). gunicorn's
gthread worker is the supported alternative (``server.kind: gunicorn`` or ``--server
gunicorn``).

Process tree under granian: this process supervises one granian server per listener (the
gateway's, and ``admin.listen`` and ``management.listen`` when set), each with its own workers.
It owns the signals:

- ``SIGTERM``/``SIGINT``: every server stops accepting and finishes what is in flight (up to
  ``server.graceful_timeout``);
- ``SIGHUP``: the configuration file is read and validated again; if valid, every worker is
  replaced by one built from it; if not, a log line says why and the old configuration stays.
  Workers read the configuration from a copy this process wrote after validating it, so a file
  edited again meanwhile is never loaded unvalidated.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar import logs
from sidecar.config import ConfigError, Settings, load_settings
from sidecar.serving.common import (
    CONFIG_DIR_ENV,
    SNAPSHOT_ENV,
    configure_logging,
    extra_listeners,
    share_metrics,
    split_bind,
)

log = logging.getLogger("sidecar.serving")

# --- granian, supervised -----------------------------------------------------------------------


@dataclass(frozen=True)
class Listener:
    target: str
    host: str
    port: int
    workers: int


def _run_granian(listener: Listener, settings: Settings) -> None:
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings

    server = settings.server
    Granian(
        listener.target,
        address=listener.host,
        port=listener.port,
        interface=Interfaces.WSGI,
        http=HTTPModes.http1,
        websockets=False,
        workers=listener.workers,
        blocking_threads=server.threads,
        backlog=server.backlog,
        # Connections a worker holds at once; hyper closes each whose request head is not in
        # within header_read_timeout, which also bounds an idle kept-alive connection.
        backpressure=server.max_connections,
        http1_settings=HTTP1Settings(
            header_read_timeout=int(server.keepalive * 1000), keep_alive=True
        ),
        factory=True,
        log_access=False,
        log_dictconfig=logs.dict_config(settings.log.format),
        workers_kill_timeout=max(1, int(server.graceful_timeout)),
        # SIGHUP: each new worker gets this long to boot before the old one is stopped.
        respawn_interval=1.0,
    ).serve()


class Supervisor:
    """One granian server per listener, in child processes; this process owns the signals."""

    def __init__(self, config_path: Path, settings: Settings, listeners: list[Listener]) -> None:
        self._config_path = config_path
        self._settings = settings
        self._listeners = listeners
        self._children: list[multiprocessing.process.BaseProcess] = []
        self._runtime = Path(tempfile.mkdtemp(prefix="sidecar-run-"))
        self._snapshot = self._runtime / "config.yaml"
        self._stop_requested = False
        self._reload_requested = False

    def run(self) -> int:
        self._write_snapshot(self._config_path.read_bytes())
        os.environ[SNAPSHOT_ENV] = str(self._snapshot)
        os.environ[CONFIG_DIR_ENV] = str(self._config_path.resolve().parent)
        context = multiprocessing.get_context("fork")
        for listener in self._listeners:
            child = context.Process(
                target=_run_granian, args=(listener, self._settings), name=listener.target
            )
            child.start()
            self._children.append(child)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        try:
            return self._watch()
        finally:
            shutil.rmtree(self._runtime, ignore_errors=True)

    def _on_stop(self, signum: int, frame: Any) -> None:
        self._stop_requested = True

    def _on_reload(self, signum: int, frame: Any) -> None:
        self._reload_requested = True

    def _watch(self) -> int:
        while True:
            if self._stop_requested:
                return self._stop(0)
            if self._reload_requested:
                self._reload_requested = False
                self._reload()
            for child in self._children:
                if not child.is_alive():
                    log.error("server %s exited with %s; stopping", child.name, child.exitcode)
                    return self._stop(1)
            time.sleep(0.2)

    def _reload(self) -> None:
        try:
            text = self._config_path.read_bytes()
            load_settings(self._config_path)  # validate, with the environment of now
        except (ConfigError, OSError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.error("SIGHUP: configuration refused, the previous one stays: %s", reason)
            return
        self._write_snapshot(text)
        log.info("SIGHUP: configuration validated; replacing the workers")
        for child in self._children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signal.SIGHUP)

    def _stop(self, code: int) -> int:
        for child in self._children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + self._settings.server.graceful_timeout + 5
        for child in self._children:
            child.join(max(0.1, deadline - time.monotonic()))
            if child.is_alive():
                child.kill()
                child.join(5)
        return code

    def _write_snapshot(self, text: bytes) -> None:
        # Written whole, then renamed: a worker starting meanwhile reads the old or the new.
        partial = self._runtime / "config.yaml.partial"
        partial.write_bytes(text)
        partial.chmod(0o600)
        partial.replace(self._snapshot)


def serve_granian(
    config_path: Path, settings: Settings, *, bind: str | None, workers: int | None
) -> None:
    listeners = granian_listeners(settings, bind=bind, workers=workers)
    refuse_ports_in_use(listeners)  # again: the narrowest window before granian binds
    share_metrics()
    configure_logging(settings.log.format)
    sys.exit(Supervisor(config_path, settings, listeners).run())


def granian_listeners(
    settings: Settings, *, bind: str | None, workers: int | None
) -> list[Listener]:
    """The gateway's listener (``--bind``, default 127.0.0.1:8080) and the configured others."""
    host, port = split_bind(bind or "127.0.0.1:8080")
    listeners = [
        Listener(
            "sidecar.serving.common:gateway_app", host, port, workers or settings.server.workers
        )
    ]
    for kind, bind_to in extra_listeners(settings):
        extra_host, extra_port = split_bind(bind_to)
        if extra_port == port:
            raise SystemExit(
                f"sidecar: error: {kind}.listen port {extra_port} is also the gateway listener's"
            )
        listeners.append(Listener(f"sidecar.serving.common:{kind}_app", extra_host, extra_port, 1))
    return listeners


def refuse_ports_in_use(listeners: list[Listener]) -> None:
    """Exits, naming the address, when another server listens on a listener's port."""
    for listener in listeners:
        if not address_free(listener.host, listener.port):
            raise SystemExit(
                f"sidecar: error: {listener.host}:{listener.port} is already in use "
                "(another server listens there)"
            )


def address_free(host: str, port: int) -> bool:
    """Whether nothing listens on ``host:port``. granian binds with SO_REUSEPORT, with no way to
    turn it off: a second server on a port in use (a copy started twice, an old instance still
    running) would bind too, and the kernel would share the connections between the two,
    whatever their configurations. A bind without SO_REUSEPORT fails on a port where any socket
    listens (SO_REUSEADDR lets it pass one merely in TIME_WAIT, after a restart). The probe is
    closed before granian binds; a server that takes the port in between is not caught."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise SystemExit(
                f"sidecar: error: cannot listen on {host}:{port}: {exc.strerror}"
            ) from None
    return True
