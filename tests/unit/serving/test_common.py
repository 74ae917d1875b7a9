"""What every server of ``sidecar serve`` shares (sidecar/serving/common.py): the bind address
parser, the metrics directory of the master, the configuration a worker reads, and the app it
builds. In-process: no server is started."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.audit.log import AUDIT_LOGGER
from sidecar.config import load_settings
from sidecar.serving import common
from sidecar.serving.common import (
    CONFIG_DIR_ENV,
    MULTIPROCESS_ENV,
    SNAPSHOT_ENV,
    build_app,
    share_metrics,
    split_bind,
    worker_settings,
)
from tests.conftest import SIDECAR_ISSUER, make_services
from tests.functional.http.admin_support import enable_admin

# --- split_bind -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bind", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("localhost:9000", ("localhost", 9000)),
        ("sidecar.internal:65535", ("sidecar.internal", 65535)),
    ],
)
def test_split_bind_accepts_host_and_port(bind: str, expected: tuple[str, int]) -> None:
    assert split_bind(bind) == expected


@pytest.mark.parametrize(
    ("bind", "expected"),
    [("[::1]:8080", ("::1", 8080)), ("[::]:443", ("::", 443)), ("[fe80::1]:1", ("fe80::1", 1))],
)
def test_split_bind_accepts_a_bracketed_ipv6_address(bind: str, expected: tuple[str, int]) -> None:
    assert split_bind(bind) == expected


@pytest.mark.parametrize(
    "bind",
    ["8080", ":8080", "localhost", "localhost:", "localhost:http", "localhost:80a", "[::1]", ""],
)
def test_split_bind_refuses_anything_else_with_a_one_line_error(bind: str) -> None:
    with pytest.raises(SystemExit) as refused:
        split_bind(bind)

    message = str(refused.value.code)
    assert message == f"sidecar: error: bind address {bind!r} is not HOST:PORT"


@pytest.mark.parametrize("bind", ["localhost:65536", "localhost:99999"])
def test_split_bind_refuses_a_port_out_of_range(bind: str) -> None:
    with pytest.raises(SystemExit):
        split_bind(bind)


@pytest.mark.parametrize("bind", ["::1:8080", "[::1:8080", "::1]:8080"])
def test_split_bind_refuses_an_ipv6_address_not_in_brackets(bind: str) -> None:
    with pytest.raises(SystemExit):
        split_bind(bind)


# --- share_metrics ----------------------------------------------------------------------------


@pytest.fixture
def no_metrics_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[tuple[Any, ...]]:
    """PROMETHEUS_MULTIPROC_DIR unset (and restored afterwards), new temporary directories made
    under tmp_path, and the exit handlers share_metrics registers recorded instead of run at the
    end of the test session."""
    monkeypatch.setenv(MULTIPROCESS_ENV, "restored afterwards")
    monkeypatch.delenv(MULTIPROCESS_ENV)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    registered: list[tuple[Any, ...]] = []

    class Atexit:
        @staticmethod
        def register(function: Callable[..., Any], *args: Any) -> None:
            registered.append((function, *args))

    monkeypatch.setattr(common, "atexit", Atexit)
    return registered


def test_share_metrics_creates_a_directory_and_names_it_in_the_environment(
    no_metrics_dir: list[tuple[Any, ...]], tmp_path: Path
) -> None:
    share_metrics()

    directory = Path(os.environ[MULTIPROCESS_ENV])
    assert directory.is_dir()
    assert directory.parent == tmp_path
    assert directory.name.startswith("sidecar-metrics-")
    assert list(directory.iterdir()) == []


def test_share_metrics_sets_the_directory_once(no_metrics_dir: list[tuple[Any, ...]]) -> None:
    share_metrics()
    first = os.environ[MULTIPROCESS_ENV]

    share_metrics()

    assert os.environ[MULTIPROCESS_ENV] == first
    assert len(no_metrics_dir) == 1


def test_share_metrics_keeps_a_directory_set_by_the_environment(
    no_metrics_dir: list[tuple[Any, ...]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    given = tmp_path / "given"
    given.mkdir()
    monkeypatch.setenv(MULTIPROCESS_ENV, str(given))

    share_metrics()

    assert os.environ[MULTIPROCESS_ENV] == str(given)
    assert no_metrics_dir == []  # not this process's to remove


def test_only_the_process_that_created_the_directory_removes_it(
    no_metrics_dir: list[tuple[Any, ...]],
) -> None:
    share_metrics()
    [(remove, *args)] = no_metrics_dir
    directory = Path(os.environ[MULTIPROCESS_ENV])
    (directory / "counter_1.db").write_bytes(b"\0" * 8)

    child = os.fork()
    if child == 0:  # a forked worker inherits the exit handler and runs it at its exit
        try:
            remove(*args)
        finally:
            os._exit(0)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert directory.is_dir()

    remove(*args)  # the master, at its exit

    assert not directory.exists()


# --- worker_settings --------------------------------------------------------------------------


def test_worker_settings_reads_the_snapshot_with_paths_relative_to_the_config_directory(
    config: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config_dir = tmp_path / "etc"
    runtime = tmp_path / "run"
    config_dir.mkdir()
    runtime.mkdir()
    config["trusted_issuers"][0]["jwks_file"] = "idp.jwks.json"  # relative to the config file
    config["tokens"]["max_ttl"] = 240
    snapshot = runtime / "config.yaml"
    snapshot.write_text(yaml.safe_dump(config))
    monkeypatch.setenv(SNAPSHOT_ENV, str(snapshot))
    monkeypatch.setenv(CONFIG_DIR_ENV, str(config_dir))

    settings = worker_settings()

    assert settings.tokens.max_ttl == 240
    jwks_file = settings.trusted_issuers[0].jwks_file
    assert jwks_file is not None
    assert settings.resolve_path(jwks_file) == config_dir / "idp.jwks.json"


def test_worker_settings_without_the_snapshot_variable_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(SNAPSHOT_ENV, raising=False)

    with pytest.raises(KeyError):
        worker_settings()


# --- build_app --------------------------------------------------------------------------------


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """build_app configures the process's logging, as a worker does: put it back afterwards."""
    root = logging.getLogger()
    audit = logging.getLogger(AUDIT_LOGGER)
    saved = (root.handlers[:], root.level, audit.handlers[:], audit.level, audit.propagate)
    yield
    root.handlers[:], _, audit.handlers[:], _, audit.propagate = saved
    root.setLevel(saved[1])
    audit.setLevel(saved[3])


@pytest.fixture
def config_file(config: dict[str, Any], credentials: dict[str, str], tmp_path: Path) -> Path:
    """A configuration with the admin API on a listener of its own, on a database as serve
    leaves it before the workers start (migrated, a key, the policies)."""
    enable_admin(config, credentials, listen="127.0.0.1:9901")
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    make_services(load_settings(path)).close()
    return path


@pytest.fixture
def built(config_file: Path, logging_restored: None) -> Iterator[Callable[[str], Any]]:
    apps: list[Any] = []

    def build(listener: str) -> Any:
        app = build_app(load_settings(config_file), listener)
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["sidecar"].close()


def test_build_app_for_the_gateway_serves_the_gateway_paths_only(
    built: Callable[[str], Any], credentials: dict[str, str]
) -> None:
    client = built("gateway").test_client()
    bearer = {"Authorization": f"Bearer {credentials['ops']}"}

    metadata = client.get("/.well-known/oauth-authorization-server")
    admin = client.get("/admin/policies", headers=bearer)

    assert metadata.status_code == 200
    assert metadata.json["issuer"] == SIDECAR_ISSUER
    assert admin.status_code == 404


def test_build_app_for_the_admin_listener_serves_the_admin_api_only(
    built: Callable[[str], Any], credentials: dict[str, str]
) -> None:
    client = built("admin").test_client()
    bearer = {"Authorization": f"Bearer {credentials['ops']}"}

    listed = client.get("/admin/policies", headers=bearer)
    health = client.get("/healthz")

    assert listed.status_code == 200
    assert len(listed.json["policies"]) == 5
    assert health.status_code == 404


def test_build_app_starts_the_workers_refresh_timers(built: Callable[[str], Any]) -> None:
    before = set(threading.enumerate())

    services = built("gateway").extensions["sidecar"]

    started = {thread.name for thread in set(threading.enumerate()) - before}
    assert {"refresh-policies", "refresh-keyring"} <= started
    assert services.readiness() == {"database": True, "signing_key": True, "serving": True}
