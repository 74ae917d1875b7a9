"""``sidecar serve --server gunicorn``'s settings (sidecar/serving/gunicorn.py,
``SidecarServer.load_config``): the configuration's ``server:`` section, then the gunicorn
settings file, then the command line; the admin listener; and a reload on SIGHUP, as gunicorn's
master runs it. In-process: gunicorn's arbiter is never started."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import Settings, load_settings
from sidecar.serving.gunicorn import DEFAULT_CONFIG, SidecarServer
from tests.conftest import write_config
from tests.functional.http.admin_support import admin_credentials, enable_admin

SERVER_SECTION = {
    "threads": 3,
    "keepalive": 7,
    "backlog": 256,
    "max_connections": 100,
    "graceful_timeout": 9,
    "workers": 4,
}


@pytest.fixture
def config(config: dict[str, Any]) -> dict[str, Any]:
    config["server"] = {"kind": "gunicorn", **SERVER_SECTION}
    return config


def server_for(
    config_file: Path,
    settings: Settings | None = None,
    server_config: Path | None = None,
    **overrides: Any,
) -> SidecarServer:
    """The server as ``serve_gunicorn`` makes it (which loads its configuration at once)."""
    return SidecarServer(
        config_file,
        settings or load_settings(config_file),
        server_config,
        {"bind": None, "workers": None, **overrides},
    )


def gunicorn_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gunicorn.conf.py"
    path.write_text(text)
    return path


@pytest.fixture
def serving_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="sidecar.serving")
    return caplog


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "sidecar.serving" and r.levelno == level
    ]


# --- the first load ---------------------------------------------------------------------------


def test_the_server_section_sets_gunicorn_settings(config_file: Path) -> None:
    cfg = server_for(config_file).cfg

    assert (cfg.threads, cfg.keepalive, cfg.backlog) == (3, 7, 256)
    assert cfg.worker_connections == 100
    assert cfg.graceful_timeout == 9
    assert cfg.workers == 4


def test_the_default_gunicorn_settings_file_applies(config_file: Path) -> None:
    cfg = server_for(config_file).cfg

    assert cfg.bind == ["127.0.0.1:8080"]
    assert cfg.worker_class_str == "gthread"
    assert cfg.preload_app is False
    assert cfg.control_socket_disable is True
    assert (cfg.limit_request_line, cfg.limit_request_fields) == (8190, 100)
    for hook in ("post_worker_init", "worker_exit", "child_exit"):
        assert getattr(cfg, hook).__code__.co_filename == str(DEFAULT_CONFIG), hook


def test_the_gunicorn_settings_file_overrides_the_server_section(
    config_file: Path, tmp_path: Path
) -> None:
    settings_file = gunicorn_file(
        tmp_path, 'bind = ["127.0.0.1:9000"]\nthreads = 8\nworkers = 2\nkeepalive = 30\n'
    )

    cfg = server_for(config_file, server_config=settings_file).cfg

    assert (cfg.threads, cfg.workers, cfg.keepalive) == (8, 2, 30)
    assert cfg.bind == ["127.0.0.1:9000"]
    assert cfg.backlog == 256  # not in the file: the server section's


def test_names_of_the_settings_file_that_are_not_gunicorn_settings_are_ignored(
    config_file: Path, tmp_path: Path
) -> None:
    settings_file = gunicorn_file(tmp_path, "import os\nhelper = 3\nthreads = 5\n")

    cfg = server_for(config_file, server_config=settings_file).cfg

    assert cfg.threads == 5
    assert "helper" not in cfg.settings


def test_command_line_options_override_the_settings_file(config_file: Path, tmp_path: Path) -> None:
    settings_file = gunicorn_file(tmp_path, 'bind = ["127.0.0.1:9000"]\nworkers = 2\n')

    cfg = server_for(
        config_file, server_config=settings_file, bind=["127.0.0.1:7000"], workers=6
    ).cfg

    assert cfg.bind == ["127.0.0.1:7000"]
    assert cfg.workers == 6


def test_the_first_load_takes_the_validated_settings_without_reading_the_file(
    config: dict[str, Any], config_file: Path
) -> None:
    settings = load_settings(config_file)
    config["tokens"]["algorithm"] = "HS256"  # the file changes after the command validated it
    write_config(config_file, config)

    server = server_for(config_file, settings)

    assert server._settings is settings
    assert server.cfg.threads == 3


# --- the admin listener -----------------------------------------------------------------------


def with_admin(config: dict[str, Any], path: Path, listen: str) -> Path:
    return write_config(path, enable_admin(config, admin_credentials(), listen))


def test_the_admin_listener_is_bound_beside_the_gateway_listeners(
    config: dict[str, Any], tmp_path: Path
) -> None:
    config_file = with_admin(config, tmp_path / "admin.yaml", "127.0.0.1:9901")

    cfg = server_for(config_file, bind=["127.0.0.1:8080", "unix:/run/sidecar.sock"]).cfg

    assert cfg.bind == ["127.0.0.1:8080", "unix:/run/sidecar.sock", "127.0.0.1:9901"]


@pytest.mark.parametrize(
    ("bind", "listen"),
    [
        (None, "127.0.0.1:8080"),  # the settings file's bind
        (["0.0.0.0:9901"], "127.0.0.1:9901"),  # --bind, on another address
        (["127.0.0.1:7000", "[::1]:9901"], "127.0.0.1:9901"),  # one of several
    ],
    ids=["settings file", "command line", "ipv6"],
)
def test_an_admin_listener_on_a_gateway_port_is_refused(
    config: dict[str, Any], tmp_path: Path, bind: list[str] | None, listen: str
) -> None:
    config_file = with_admin(config, tmp_path / "admin.yaml", listen)
    port = listen.rsplit(":", 1)[1]

    with pytest.raises(SystemExit) as refused:
        server_for(config_file, bind=bind)

    assert refused.value.code == (
        f"sidecar: error: admin.listen port {port} is also a gateway listener's port"
    )


def test_a_unix_socket_gateway_listener_never_collides_with_the_admin_port(
    config: dict[str, Any], tmp_path: Path
) -> None:
    config_file = with_admin(config, tmp_path / "admin.yaml", "127.0.0.1:9901")

    cfg = server_for(config_file, bind=["unix:/run/sidecar-9901"]).cfg

    assert cfg.bind == ["unix:/run/sidecar-9901", "127.0.0.1:9901"]


# --- SIGHUP: the configuration file read and validated again ----------------------------------


def test_a_reload_with_a_valid_file_applies_it(
    config: dict[str, Any], config_file: Path, serving_log: pytest.LogCaptureFixture
) -> None:
    server = server_for(config_file)
    config["server"]["threads"] = 6
    config["tokens"]["max_ttl"] = 200
    write_config(config_file, config)

    server.reload()  # what gunicorn's master runs on SIGHUP

    assert server.cfg.threads == 6
    assert server._settings.tokens.max_ttl == 200
    assert messages(serving_log, logging.INFO) == [
        "SIGHUP: configuration validated; replacing the workers"
    ]


def test_a_reload_with_an_invalid_file_keeps_the_previous_settings(
    config: dict[str, Any], tmp_path: Path, serving_log: pytest.LogCaptureFixture
) -> None:
    config_file = with_admin(config, tmp_path / "admin.yaml", "127.0.0.1:9901")
    server = server_for(config_file)
    previous = server._settings
    config["server"]["threads"] = 6
    config["tokens"]["algorithm"] = "HS256"
    write_config(config_file, config)

    server.reload()

    [refused] = messages(serving_log, logging.ERROR)
    assert refused.startswith("SIGHUP: configuration refused, the previous one stays: ")
    assert "tokens.algorithm" in refused
    assert server._settings is previous
    assert server.cfg.threads == 3
    assert server.cfg.bind == ["127.0.0.1:8080", "127.0.0.1:9901"]


def test_a_reload_with_the_file_gone_keeps_the_previous_settings(
    config_file: Path, serving_log: pytest.LogCaptureFixture
) -> None:
    server = server_for(config_file)
    previous = server._settings
    config_file.unlink()

    server.reload()

    [refused] = messages(serving_log, logging.ERROR)
    assert "configuration refused" in refused
    assert server._settings is previous
    assert server.cfg.workers == 4


def test_a_reload_keeps_the_command_line_options(config: dict[str, Any], config_file: Path) -> None:
    server = server_for(config_file, bind=["127.0.0.1:7000"], workers=6)
    config["server"]["workers"] = 2
    write_config(config_file, config)

    server.reload()

    assert server.cfg.bind == ["127.0.0.1:7000"]
    assert server.cfg.workers == 6


def test_a_reload_moving_the_admin_listener_onto_a_gateway_port_is_refused(
    config: dict[str, Any], tmp_path: Path, serving_log: pytest.LogCaptureFixture
) -> None:
    config_file = with_admin(config, tmp_path / "admin.yaml", "127.0.0.1:9901")
    server = server_for(config_file)
    config["admin"]["listen"] = "127.0.0.1:8080"
    write_config(config_file, config)

    server.reload()  # gunicorn's master would exit here, taking every worker with it

    assert "configuration refused" in messages(serving_log, logging.ERROR)[0]
    assert server.cfg.bind == ["127.0.0.1:8080", "127.0.0.1:9901"]


@pytest.mark.parametrize("name", ["keepalive", "graceful_timeout"])
def test_a_sub_second_duration_is_never_rounded_down_to_zero(
    config: dict[str, Any], tmp_path: Path, name: str
) -> None:
    config["server"][name] = 0.5
    config_file = write_config(tmp_path / "short.yaml", config)

    assert getattr(server_for(config_file).cfg, name) >= 1
