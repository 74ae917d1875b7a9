"""``sidecar serve``: the app under gunicorn, configured by ``deploy/gunicorn.conf.py``."""

from __future__ import annotations

import runpy
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from sidecar.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GUNICORN_CONFIG = REPO_ROOT / "deploy" / "gunicorn.conf.py"


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

    def load(self) -> Any:
        # Runs in each worker (no preload): every worker owns its database pool and caches.
        from sidecar.web.app import create_app

        return create_app(self._settings)


def serve(
    settings: Settings, *, bind: str | None, workers: int | None, config_file: Path | None
) -> None:
    if config_file is None and DEFAULT_GUNICORN_CONFIG.is_file():
        config_file = DEFAULT_GUNICORN_CONFIG
    SidecarServer(
        settings, config_file, {"bind": [bind] if bind else None, "workers": workers}
    ).run()
