"""`make run` on a database the user changed through the README's own steps: it serves again.
(It used to re-apply deploy/demo.yaml's policies on every run, and after the README's policy tour
that apply failed on an overlap: serve now bootstraps only an empty policy table.)

The recipe is read from `make -n run` (so the test follows the Makefile), run in a copy of the
demo's files with a free port instead of 8080."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import requests

from tests.launcher import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / ".venv" / "bin"


def recipe() -> list[list[str]]:
    done = subprocess.run(
        ["make", "-n", "run", "CONFIG=deploy/demo.yaml", f"BIN={BIN}", "PYTHON=python3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    # Only the recipe's own sidecar commands (not the install steps `make -n` also lists when
    # the virtual environment looks out of date).
    sidecar = str(BIN / "sidecar")
    commands = [shlex.split(line) for line in done.stdout.splitlines() if line.startswith(sidecar)]
    assert commands[-1][-1] == "serve", commands
    return commands


def environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "SIDECAR_CONFIG"}


def make_run(home: Path) -> None:
    """Every step of the recipe; the last one, serve, until it is ready, then stopped."""
    *steps, serve = recipe()
    for step in steps:
        done = subprocess.run(step, cwd=home, capture_output=True, text=True, env=environment())
        assert done.returncode == 0, (step, done.stderr)
    port = free_port()
    process = subprocess.Popen(
        [*serve, "--bind", f"127.0.0.1:{port}"],
        cwd=home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=environment(),
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            try:
                if requests.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "make run's serve never became ready"
            time.sleep(0.1)
    finally:
        os.killpg(process.pid, 9)  # not a test of shutdown (tests/functional/test_serve.py is)
        process.wait(timeout=30)


def sidecar(home: Path, *args: str) -> str:
    done = subprocess.run(
        [str(BIN / "sidecar"), "--config", "deploy/demo.yaml", *args],
        cwd=home,
        capture_output=True,
        text=True,
        env=environment(),
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_run_serves_again_after_the_readmes_policy_tour(tmp_path: Path) -> None:
    (tmp_path / "deploy").mkdir()
    for name in ("demo.yaml", "policies.example.yaml"):
        shutil.copy(REPO / "deploy" / name, tmp_path / "deploy" / name)

    make_run(tmp_path)
    # The tour of docs/policies.md: the example policies replace the demo's, then a rollback.
    sidecar(
        tmp_path, "policy", "apply", "deploy/policies.example.yaml", "--prune", "--actor", "alice"
    )
    sidecar(tmp_path, "policy", "rollback", "tickets", "--to", "1", "--actor", "alice")
    make_run(tmp_path)

    listed = sidecar(tmp_path, "policy", "list", "--json")
    assert {"code-search", "tickets"} <= {p["name"] for p in json.loads(listed)}
