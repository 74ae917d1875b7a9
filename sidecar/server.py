"""``sidecar serve``: the app under gunicorn, configured by ``deploy/gunicorn.conf.py``."""

from __future__ import annotations

import atexit
import gc
import logging
import os
import runpy
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from sidecar import REPO_ROOT, auditlog
from sidecar.config import Settings

DEFAULT_GUNICORN_CONFIG = REPO_ROOT / "deploy" / "gunicorn.conf.py"
# The same name as sidecar.metrics.MULTIPROCESS_ENV; not imported from there because
# prometheus_client must not be imported in the master before this variable is set.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


class SidecarServer(BaseApplication):  # type: ignore[misc]
    def __init__(
        self, settings: Settings, config_file: Path | None, overrides: dict[str, Any]
    ) -> None:
        self._settings = settings
        self._config_file = config_file
        self._overrides = overrides
        super().__init__()

    def load_config(self) -> None:
        values: dict[str, Any] = {}
        if self._config_file is not None:
            values = runpy.run_path(str(self._config_file))
        values.update({k: v for k, v in self._overrides.items() if v is not None})
        for name, value in values.items():
            if name in self.cfg.settings:
                self.cfg.set(name, value)
        admin = self._settings.admin
        if admin is not None and admin.listen:
            # The admin API's own listener, beside the gateway's (see web.app). The listener is
            # recognised by its port, so no gateway listener may share it.
            port = admin.listen.rsplit(":", 1)[1]
            if any(
                b.rsplit(":", 1)[-1] == port for b in self.cfg.bind if not b.startswith("unix:")
            ):
                raise SystemExit(
                    f"sidecar: error: admin.listen port {port} is also a gateway listener's port"
                )
            self.cfg.set("bind", [*self.cfg.bind, admin.listen])

    def load(self) -> Any:
        # Runs in each worker (no preload): every worker owns its database pool and caches.
        from sidecar.web.app import create_app

        configure_logging()
        app = create_app(self._settings)
        from gunicorn.workers.gasgi import ASGIWorker

        if issubclass(self.cfg.worker_class, ASGIWorker):
            from sidecar.web.asgi import AsgiBridge

            return settle(AsgiBridge(app))
        return settle(app)


def settle(app: Any) -> Any:
    """After a worker built its app: the objects it holds for its whole life (configuration,
    policies, keys, SQLAlchemy's tables) are moved out of the garbage collector's view, so the
    collections that request garbage triggers stay short instead of scanning them each time."""
    gc.freeze()  # no collection first: it would touch (and copy) every page inherited from
    return app  # the master


LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


def configure_logging() -> None:
    """The service's own log lines (audit, key and issuer events) on stderr, beside gunicorn's;
    the audit lines through the handler that the audit writer feeds a batch at a time."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    auditlog.install(sys.stderr, logging.Formatter(LOG_FORMAT))


def _share_metrics() -> None:
    # Workers share their metrics through this directory (prometheus_client multiprocess mode);
    # it is set before any worker imports prometheus_client.
    if not os.environ.get(MULTIPROCESS_ENV):
        metrics_dir = tempfile.mkdtemp(prefix="sidecar-metrics-")
        atexit.register(_remove_in_master, metrics_dir, os.getpid())
        os.environ[MULTIPROCESS_ENV] = metrics_dir


def _remove_in_master(path: str, master_pid: int) -> None:
    # Workers are forks of the master and inherit its atexit handlers: a worker that exits
    # (SIGTERM, SIGHUP reload, max_requests) must not delete the directory the others write to.
    if os.getpid() == master_pid:
        shutil.rmtree(path, ignore_errors=True)


def serve(
    settings: Settings, *, bind: str | None, workers: int | None, config_file: Path | None
) -> None:
    if config_file is None and DEFAULT_GUNICORN_CONFIG.is_file():
        config_file = DEFAULT_GUNICORN_CONFIG
    _share_metrics()
    # Objects of the master that every worker inherits: out of the collector's reach, so that no
    # collection in a worker writes to (and so copies) the pages they share.
    gc.freeze()
    SidecarServer(
        settings, config_file, {"bind": [bind] if bind else None, "workers": workers}
    ).run()


CONFIG_ENV = "SIDECAR_CONFIG"
GRANIAN_KILL_TIMEOUT = 20  # seconds, as gunicorn's graceful_timeout
GRANIAN_THREADS = 4  # per worker, as gunicorn's threads


def serve_granian(config_path: Path, *, bind: str | None, workers: int | None) -> None:
    """``sidecar serve --server granian``: the same app under granian's WSGI interface (HTTP/1.1
    parsing and connection handling in Rust). Each worker reads the config file again."""
    try:
        from granian import Granian
        from granian.constants import HTTPModes, Interfaces
    except ImportError:
        raise SystemExit(
            "sidecar: error: --server granian needs granian: pip install "
            "'token-exchange-sidecar[granian]'"
        ) from None
    host, _, port = (bind or "127.0.0.1:8080").rpartition(":")
    os.environ[CONFIG_ENV] = str(config_path)
    _share_metrics()
    configure_logging()
    Granian(
        "sidecar.server:granian_app",
        address=host.strip("[]"),
        port=int(port),
        interface=Interfaces.WSGI,
        http=HTTPModes.http1,
        workers=workers or 2,
        # The app is CPU-bound under one GIL per worker: a few threads run it, the rest of the
        # connections wait in granian (Rust) rather than as Python threads.
        blocking_threads=GRANIAN_THREADS,
        factory=True,
        log_access=False,
        workers_kill_timeout=GRANIAN_KILL_TIMEOUT,
    ).serve()


def granian_app() -> Any:
    """The WSGI app in a granian worker (``sidecar serve --server granian``): the settings are
    read again from the config file the command was given."""
    from sidecar.config import load_settings
    from sidecar.web.app import create_app

    configure_logging()
    return settle(create_app(load_settings(Path(os.environ[CONFIG_ENV]))))
