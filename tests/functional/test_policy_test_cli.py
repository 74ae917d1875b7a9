"""``sidecar policy test`` as CI runs it: the installed command in a subprocess, on the demo
configuration, the shipped example case file and its policies. Its exit status is the contract:
0 every case passed, 1 a case failed, 2 the case or policy file is invalid (nothing ran)."""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.launcher import SIDECAR

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO_ROOT / "deploy" / "demo.yaml"
EXAMPLE_POLICIES = REPO_ROOT / "deploy" / "policies.example.yaml"
EXAMPLE_CASES = REPO_ROOT / "deploy" / "policies.example.test.yaml"


def policy_test(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``sidecar --config deploy/demo.yaml policy test ARGS...`` run in ``cwd``: the demo's
    relative database path is never opened when a policy file is tested, but its directory
    would be made there."""
    environment = {k: v for k, v in os.environ.items() if k != "SIDECAR_CONFIG"}
    return subprocess.run(
        [*SIDECAR, "--config", str(DEMO_CONFIG), "policy", "test", *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=cwd,
        timeout=60,
    )


@pytest.fixture
def loosened(tmp_path: Path) -> Path:
    """The example policies with require_subject_scopes turned off: a case of the example fails."""
    text = EXAMPLE_POLICIES.read_text()
    path = tmp_path / "loosened.yaml"
    path.write_text(text.replace("require_subject_scopes: true", "require_subject_scopes: false"))
    return path


def test_the_shipped_example_passes_with_exit_0(tmp_path: Path) -> None:
    result = policy_test(tmp_path, str(EXAMPLE_CASES))

    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert all(line.startswith("PASS ") for line in lines[:-1])
    assert lines[-1].endswith(
        f"passed, 0 failed, {len(lines) - 1} case(s) against {EXAMPLE_POLICIES}"
    )
    assert result.stderr == ""


def test_a_failing_case_exits_1_with_the_diff_and_reports(tmp_path: Path, loosened: Path) -> None:
    junit = tmp_path / "report.xml"

    text = policy_test(
        tmp_path, str(EXAMPLE_CASES), "--policies", str(loosened), "--junit", str(junit)
    )
    as_json = policy_test(tmp_path, str(EXAMPLE_CASES), "--policies", str(loosened), "--json")

    assert text.returncode == 1, text.stderr
    assert (
        "FAIL a scope the user's own token lacks is refused (require_subject_scopes)\n"
        "    decision: expected denied, got granted (policies [code-search], "
        "scopes [code.read, code.search], lifetime 120)\n"
    ) in text.stdout
    suite = ET.parse(junit).getroot()
    assert int(suite.get("failures") or 0) >= 1
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert report["policies"] == str(loosened)
    assert report["failed"] == int(suite.get("failures") or 0)


def test_an_invalid_case_file_exits_2_and_runs_nothing(tmp_path: Path) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        "cases:\n"
        "  - name: typo\n"
        "    client: gateway\n"
        "    subject: {iss: https://idp.demo.local, sub: alice}\n"
        "    audience: https://tickets.internal/mcp\n"
        "    expect: {decision: granted, scope: [tickets.read]}\n"
    )

    result = policy_test(tmp_path, str(cases), "--policies", str(EXAMPLE_POLICIES))

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"sidecar: error: invalid test cases: {cases}:6: cases[0] (typo): expect.scope: "
        "unknown key\n"
    )


def test_an_invalid_policy_file_exits_2(tmp_path: Path) -> None:
    policies = tmp_path / "policies.yaml"
    policies.write_text(EXAMPLE_POLICIES.read_text().replace("ttl: 120", "ttl: 100000"))

    result = policy_test(tmp_path, str(EXAMPLE_CASES), "--policies", str(policies))

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("sidecar: error: invalid policies: ")
    assert "ttl" in result.stderr
