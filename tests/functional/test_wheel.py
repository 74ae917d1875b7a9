"""The package as a user installs it, and the steps of deploy/Dockerfile: a wheel built with
`pip wheel .`, installed into a fresh virtual environment outside the checkout, runs every
command a deployment needs from a directory that holds nothing but its configuration (no
checkout on the path), as a non-root user (``nobody`` when the suite runs as root)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
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


NOBODY = 65534
AS_USER: dict[str, int] = {"user": NOBODY, "group": NOBODY} if os.geteuid() == 0 else {}


def reachable_directory(prefix: str) -> Path:
    """A directory outside pytest's (root-only) temporary tree that the unprivileged user can
    read (and, for the working directory, write)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def base_python() -> str:
    """The interpreter the fresh venv is made from: one the unprivileged user may run (this
    suite's own may live under root's home, which nobody else can enter)."""
    if not AS_USER:
        return sys.executable
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys, venv; sys.exit(sys.version_info < (3, 11))"],
                capture_output=True,
                timeout=30,
                check=False,
                **AS_USER,
            )
        except OSError:  # missing, or not executable by that user
            continue
        if probe.returncode == 0:
            return candidate
    pytest.fail("no Python 3.11+ interpreter that an unprivileged user may run")


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    """The `sidecar` command of a fresh venv holding the wheel (and its dependencies)."""
    root = reachable_directory("sidecar-wheel-")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root), str(CHECKOUT)],
        check=True,
        timeout=300,
        env=_clean_env(),
        capture_output=True,
    )
    [wheel] = root.glob("token_exchange_sidecar-*.whl")
    venv = root / "venv"
    subprocess.run([base_python(), "-m", "venv", str(venv)], check=True, timeout=120)
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
    yield venv / "bin" / "sidecar"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """The configuration's directory (the image's /etc/sidecar), made read-only once the test
    has written the configuration into it (see :func:`read_only`)."""
    path = reachable_directory("sidecar-run-")
    yield path
    path.chmod(0o755)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def state() -> Iterator[Path]:
    """The only writable places (the image's /var/lib/sidecar and /tmp): the database's
    directory and TMPDIR, owned by the unprivileged user."""
    path = reachable_directory("sidecar-state-")
    (path / "tmp").mkdir()
    if AS_USER:
        for owned in (path, path / "tmp"):
            os.chown(owned, NOBODY, NOBODY)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def read_only(directory: Path) -> None:
    """The unprivileged user may read ``directory`` but create nothing in it (as on a read-only
    root filesystem)."""
    directory.chmod(0o555)


@contextlib.contextmanager
def checkout_out_of_reach() -> Iterator[None]:
    """Under root, the checkout is closed to the unprivileged user for the duration (root's own
    processes, the rest of the suite included, are not affected by a mode)."""
    if not AS_USER:
        yield
        return
    mode = CHECKOUT.stat().st_mode & 0o7777
    CHECKOUT.chmod(0o700)
    try:
        yield
    finally:
        CHECKOUT.chmod(mode)


def deployed_env(state: Path) -> dict[str, str]:
    """As in the image: temporary files under the writable state, no usable home directory."""
    return {**_clean_env(), "TMPDIR": str(state / "tmp"), "HOME": "/nonexistent"}


def run(sidecar: Path, cwd: Path, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(sidecar), "--config", str(cwd / "sidecar.yaml"), *args],
        cwd=cwd,
        env=deployed_env(state),
        **AS_USER,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_an_installed_wheel_runs_outside_the_checkout_as_a_non_root_user(
    installed: Path, workdir: Path, state: Path
) -> None:
    """From a read-only configuration directory, writing only to the state directory and
    TMPDIR, with the checkout out of reach (under root)."""
    with checkout_out_of_reach():
        run_every_deployment_step(installed, workdir, state)


def run_every_deployment_step(installed: Path, tmp_path: Path, state: Path) -> None:
    idp = TestIdP(tmp_path)
    config: dict[str, Any] = base_config(idp, ClientKeys(), f"sqlite:///{state / 's.db'}")
    (tmp_path / "sidecar.yaml").write_text(yaml.safe_dump(config))
    written_by_the_test = [p.name for p in tmp_path.iterdir()]
    read_only(tmp_path)
    # Nothing of the checkout is importable from there.
    probe = subprocess.run(
        [str(installed.parent / "python"), "-c", "import sidecar; print(sidecar.__file__)"],
        cwd=tmp_path,
        env=deployed_env(state),
        capture_output=True,
        text=True,
        check=True,
        **AS_USER,
    )
    assert not probe.stdout.strip().startswith(str(CHECKOUT))
    if AS_USER:  # and nothing of it is even readable
        listing = subprocess.run(["ls", str(CHECKOUT)], capture_output=True, check=False, **AS_USER)
        assert listing.returncode != 0

    checked = run(installed, tmp_path, state, "check-config")
    assert checked.returncode == 0, checked.stderr
    upgraded = run(installed, tmp_path, state, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    applied = run(installed, tmp_path, state, "policy", "apply", str(tmp_path / "sidecar.yaml"))
    assert applied.returncode == 0, applied.stderr
    listed = run(installed, tmp_path, state, "policy", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert "code-search" in listed.stdout

    port = free_port()
    output = state / "serve.log"
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
            env=deployed_env(state),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **AS_USER,
        )
    STARTED.append(process)
    served = Served(process, f"http://127.0.0.1:{port}", port, config, tmp_path / "x", output)
    try:
        served.wait_ready()
        if AS_USER:  # every process of the server runs as the unprivileged user
            assert os.stat(f"/proc/{process.pid}").st_uid == NOBODY
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
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(written_by_the_test)
    # The gunicorn alternative ships in the wheel too.
    gunicorn_conf = subprocess.run(
        [
            str(installed.parent / "python"),
            "-c",
            "from sidecar.serving.gunicorn import DEFAULT_CONFIG; print(DEFAULT_CONFIG.is_file())",
        ],
        cwd=tmp_path,
        env=deployed_env(state),
        capture_output=True,
        text=True,
        check=True,
    )
    assert gunicorn_conf.stdout.strip() == "True"
