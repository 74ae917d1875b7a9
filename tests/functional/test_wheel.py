"""The package as a user installs it: a wheel built with `pip wheel .`, installed into a fresh
virtual environment outside the checkout, runs every command a deployment needs from a
directory that holds nothing but its configuration (no checkout on the path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.conftest import (
    ACCESS_TOKEN_TYPE,
    CODE_SEARCH,
    GATEWAY_SECRET,
    TOKEN_EXCHANGE,
    ClientKeys,
    TestIdP,
    base_config,
)
from tests.launcher import STARTED, Served, free_port

CHECKOUT = Path(__file__).resolve().parents[2]


def _clean_env() -> dict[str, str]:
    dropped = ("PYTHONPATH", "SIDECAR_CONFIG", "VIRTUAL_ENV", "PROMETHEUS_MULTIPROC_DIR")
    return {k: v for k, v in os.environ.items() if k not in dropped}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `sidecar` command of a fresh venv holding the wheel (and its dependencies)."""
    root = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root), str(CHECKOUT)],
        check=True,
        timeout=300,
        env=_clean_env(),
        capture_output=True,
    )
    [wheel] = root.glob("token_exchange_sidecar-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", f"{wheel}[postgres]"],
        timeout=600,
        env=_clean_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if pip.returncode != 0:
        pytest.fail(f"installing the wheel failed:\n{pip.stdout}\n{pip.stderr}")
    return venv / "bin" / "sidecar"


def run(sidecar: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(sidecar), "--config", str(cwd / "sidecar.yaml"), *args],
        cwd=cwd,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_an_installed_wheel_runs_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    idp = TestIdP(tmp_path)
    config: dict[str, Any] = base_config(idp, ClientKeys(), f"sqlite:///{tmp_path / 's.db'}")
    (tmp_path / "sidecar.yaml").write_text(yaml.safe_dump(config))
    # Nothing of the checkout is importable from there.
    probe = subprocess.run(
        [str(installed.parent / "python"), "-c", "import sidecar; print(sidecar.__file__)"],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert not probe.stdout.strip().startswith(str(CHECKOUT))

    checked = run(installed, tmp_path, "check-config")
    assert checked.returncode == 0, checked.stderr
    upgraded = run(installed, tmp_path, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    applied = run(installed, tmp_path, "policy", "apply", str(tmp_path / "sidecar.yaml"))
    assert applied.returncode == 0, applied.stderr
    listed = run(installed, tmp_path, "policy", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert "code-search" in listed.stdout

    port = free_port()
    output = tmp_path / "serve.log"
    with output.open("wb") as sink:
        process = subprocess.Popen(
            [
                str(installed),
                "--config",
                str(tmp_path / "sidecar.yaml"),
                "serve",
                "--bind",
                f"127.0.0.1:{port}",
            ],
            cwd=tmp_path,
            env=_clean_env(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    STARTED.append(process)
    served = Served(process, f"http://127.0.0.1:{port}", port, config, tmp_path / "x", output)
    try:
        served.wait_ready()
        response = requests.post(
            served.token_url,
            data={
                "grant_type": TOKEN_EXCHANGE,
                "subject_token": idp.token(),
                "subject_token_type": ACCESS_TOKEN_TYPE,
                "audience": CODE_SEARCH,
            },
            auth=("gateway", GATEWAY_SECRET),
            timeout=10,
        )
        assert response.status_code == 200, response.text
    finally:
        served.kill()
    # The gunicorn alternative ships in the wheel too.
    gunicorn_conf = subprocess.run(
        [
            str(installed.parent / "python"),
            "-c",
            "from sidecar.serving.gunicorn import DEFAULT_CONFIG; print(DEFAULT_CONFIG.is_file())",
        ],
        cwd=tmp_path,
        env=_clean_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert gunicorn_conf.stdout.strip() == "True"
