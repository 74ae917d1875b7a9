"""sidecar/cli/actors.py: ``--actor`` of the commands that change policies or keys names a
person or a job, never nothing and never one of the names the service records for itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TICKETS
from tests.unit.support import cli

TICKETS_POLICY = f"gateway -> {TICKETS}"


def history_actors(config_file: Path) -> list[str]:
    result = cli(config_file, "policy", "history", TICKETS_POLICY, "--json")
    assert result.exit_code == 0, result.output
    return [version["changed_by"] for version in json.loads(result.stdout)]


@pytest.mark.parametrize(
    "actor",
    ["", "   ", "bootstrap", "sidecar", "admin:ops", "bob\x1b[2J", "x" * 256],
    ids=["empty", "blank", "bootstrap", "sidecar", "admin", "control", "too-long"],
)
def test_a_change_by_an_actor_the_service_records_or_no_one_is_refused(
    started: Path, actor: str
) -> None:
    before = history_actors(started)

    result = cli(started, "policy", "disable", TICKETS_POLICY, "--actor", actor)

    assert result.exit_code == 2
    assert "--actor" in result.stderr
    assert history_actors(started) == before  # nothing changed


def test_a_key_rotation_by_admin_name_is_refused(started: Path) -> None:
    result = cli(started, "keys", "rotate", "--actor", "admin:ops")
    assert result.exit_code == 2
    assert "admin:NAME" in result.stderr


def test_a_named_actor_is_recorded_without_surrounding_spaces(started: Path) -> None:
    result = cli(started, "policy", "disable", TICKETS_POLICY, "--actor", " ci-bot ")
    assert result.exit_code == 0, result.output
    assert history_actors(started)[-1] == "ci-bot"


@pytest.mark.parametrize(("user", "recorded"), [("alice", "alice"), ("sidecar", "os:sidecar")])
def test_the_default_actor_is_the_os_user_never_passing_for_the_service(
    started: Path, monkeypatch: pytest.MonkeyPatch, user: str, recorded: str
) -> None:
    # getpass.getuser() reads LOGNAME first; the image's user is named "sidecar".
    monkeypatch.setenv("LOGNAME", user)

    result = cli(started, "policy", "disable", TICKETS_POLICY)

    assert result.exit_code == 0, result.output
    assert history_actors(started)[-1] == recorded
