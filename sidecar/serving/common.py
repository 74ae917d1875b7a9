"""What every server of ``sidecar serve`` shares: logging, the metrics directory, and the app
each worker builds from the validated configuration."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from sidecar import logs
from sidecar.audit import log as auditlog
from sidecar.config import Settings, load_settings
from sidecar.config.common import parse_listen

# The same name as sidecar.metrics.MULTIPROCESS_ENV; not imported from there because
# prometheus_client must not be imported in the master before this variable is set.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Set for the workers: the validated copy of the configuration, and the directory relative paths
# in it resolve against (the original file's).
SNAPSHOT_ENV = "SIDECAR_CONFIG_SNAPSHOT"
CONFIG_DIR_ENV = "SIDECAR_CONFIG_DIR"
LOG_FORMAT = logs.TEXT_FORMAT


def configure_logging(kind: str = "auto") -> None:
    """Every log line of the process on stderr in one format (``log.format``), the server's
    included; the audit lines through the handler that the audit writer feeds a batch at a
    time."""
    formatter = logs.configure(kind, sys.stderr)
    auditlog.install(sys.stderr, formatter)


def share_metrics() -> None:
    """Workers share their metrics through one directory (prometheus_client multiprocess mode);
    it is set before any worker imports prometheus_client."""
    if not os.environ.get(MULTIPROCESS_ENV):
        metrics_dir = tempfile.mkdtemp(prefix="sidecar-metrics-")
        atexit.register(_remove_in_master, metrics_dir, os.getpid())
        os.environ[MULTIPROCESS_ENV] = metrics_dir


def _remove_in_master(path: str, master_pid: int) -> None:
    # Forked processes inherit atexit handlers: only the process that made it removes it.
    if os.getpid() == master_pid:
        shutil.rmtree(path, ignore_errors=True)


# --- the workers' app ------------------------------------------------------------------------


def worker_settings() -> Settings:
    """The validated configuration, in a worker."""
    return load_settings(
        Path(os.environ[SNAPSHOT_ENV]), config_dir=Path(os.environ[CONFIG_DIR_ENV])
    )


def build_app(settings: Settings, listener: str) -> Any:
    """The WSGI app of one worker; its services are closed (the audit queue written) when the
    worker exits."""
    from multiprocessing.util import Finalize

    from sidecar.web.app import create_app

    configure_logging(settings.log.format)
    app = create_app(settings, listener=listener)
    services = app.extensions["sidecar"]
    services.start_background()
    # A granian worker is a multiprocessing child whose target returns after a graceful stop:
    # multiprocessing runs its finalizers then, not atexit's.
    Finalize(None, services.close, exitpriority=10)
    return app


def gateway_app() -> Any:
    """granian's factory for the gateway's listener (``/token``, well-known, health)."""
    return build_app(worker_settings(), "gateway")


def management_app() -> Any:
    """granian's factory for ``management.listen``."""
    return build_app(worker_settings(), "management")


def admin_app() -> Any:
    """granian's factory for ``admin.listen``."""
    return build_app(worker_settings(), "admin")


def ext_authz_app() -> Any:
    """granian's factory for ``ext_authz.listen`` (Envoy's authorization checks)."""
    return build_app(worker_settings(), "ext_authz")


def extra_listeners(settings: Settings) -> list[tuple[str, str]]:
    """The listeners beside the gateway's, as (kind, HOST:PORT): the admin API's, the
    management listener and Envoy's ext_authz listener, when configured."""
    found = []
    if settings.admin is not None and settings.admin.listen:
        found.append(("admin", settings.admin.listen))
    if settings.management is not None:
        found.append(("management", settings.management.listen))
    if settings.ext_authz is not None:
        found.append(("ext_authz", settings.ext_authz.listen))
    return found


def split_bind(bind: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT``, or a one-line exit."""
    try:
        return parse_listen(bind)
    except ValueError:
        raise SystemExit(f"sidecar: error: bind address {bind!r} is not HOST:PORT") from None
