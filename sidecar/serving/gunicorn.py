"""``sidecar serve --server gunicorn``: the app under gunicorn's gthread worker (a thread per
request in flight), configured by ``gunicorn_conf.py`` beside this module or ``--gunicorn-config``.

gunicorn binds every listener itself (the gateway's and ``admin.listen``) and answers ``SIGHUP``
by re-running :meth:`SidecarServer.load_config` in the master, which reads and validates the
configuration file again: a valid one replaces the workers, an invalid one is logged and the
previous configuration stays.
"""

from __future__ import annotations

import gc
import logging
import math
import runpy
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from sidecar import logs
from sidecar.config import ConfigError, Settings, load_settings
from sidecar.serving.common import (
    build_app,
    configure_logging,
    extra_listeners,
    share_metrics,
    split_bind,
)

DEFAULT_CONFIG = Path(__file__).with_name("gunicorn_conf.py")
log = logging.getLogger("sidecar.serving")


class SidecarServer(BaseApplication):  # type: ignore[misc]
    def __init__(
        self,
        config_path: Path,
        settings: Settings,
        server_config: Path | None,
        overrides: dict[str, Any],
    ) -> None:
        self._config_path = config_path
        self._settings = settings
        self._server_config = server_config or DEFAULT_CONFIG
        self._overrides = overrides
        self._loaded_once = False
        super().__init__()

    def load_config(self) -> None:
        if self._loaded_once:  # SIGHUP: the configuration file again, validated first
            try:
                candidate = load_settings(self._config_path)
                _check_listeners(candidate, self._values(candidate).get("bind", []))
            except (ConfigError, OSError) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                log.error("SIGHUP: configuration refused, the previous one stays: %s", reason)
            else:
                self._settings = candidate
                log.info("SIGHUP: configuration validated; replacing the workers")
        else:
            try:
                _check_listeners(self._settings, self._values(self._settings).get("bind", []))
            except ConfigError as exc:
                raise SystemExit(f"sidecar: error: {exc}") from None
        self._loaded_once = True
        values = self._values(self._settings)
        for name, value in values.items():
            if name in self.cfg.settings:
                self.cfg.set(name, value)
        for _, bind_to in extra_listeners(self._settings):
            self.cfg.set("bind", [*self.cfg.bind, bind_to])

    def _values(self, settings: Settings) -> dict[str, Any]:
        """gunicorn's settings: the server section, then the gunicorn file, then the command
        line."""
        server = settings.server
        values: dict[str, Any] = {
            "threads": server.threads,
            # gunicorn takes whole seconds: a sub-second value must not become 0 (no
            # keep-alive, no grace at all).
            "keepalive": max(1, math.ceil(server.keepalive)),
            "backlog": server.backlog,
            "worker_connections": server.max_connections,
            "graceful_timeout": max(1, math.ceil(server.graceful_timeout)),
            "workers": server.workers,
            "bind": ["127.0.0.1:8080"],
            "logconfig_dict": logs.dict_config(settings.log.format),
        }
        values.update(runpy.run_path(str(self._server_config)))
        values.update({k: v for k, v in self._overrides.items() if v is not None})
        return values

    def load(self) -> Any:
        # Runs in each worker (no preload): every worker owns its database pool and caches.
        app = build_app(self._settings, listener="any")
        gc.freeze()
        return app


def _check_listeners(settings: Settings, gateway_binds: list[str]) -> None:
    """Each extra listener is recognised by its port, so no gateway listener may share it."""
    ports = set()
    for bind in gateway_binds:
        if not bind.startswith(("unix:", "fd://")):
            ports.add(split_bind(bind)[1])
    for kind, bind_to in extra_listeners(settings):
        port = split_bind(bind_to)[1]
        if port in ports:
            raise ConfigError(f"{kind}.listen port {port} is also a gateway listener's port")
        ports.add(port)


def serve_gunicorn(
    config_path: Path,
    settings: Settings,
    *,
    bind: str | None,
    workers: int | None,
    server_config: Path | None,
) -> None:
    share_metrics()
    configure_logging(settings.log.format)
    SidecarServer(
        config_path,
        settings,
        server_config,
        {"bind": [bind] if bind else None, "workers": workers},
    ).run()
