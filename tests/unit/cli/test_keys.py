"""``sidecar keys list|rotate|retire`` (sidecar/cli/keys.py), in-process through click, on a
SQLite file. tests/functional/test_cli.py runs the installed command; these drive the command
functions and read the keyring back with ``keys list --json``."""

from __future__ import annotations

import calendar
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.store import migrate
from sidecar.store.db import make_engine
from tests.unit.support import cli, invoke, one_line_error

WHEN = re.compile(r"^(-|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)$")
PUBLISH_AHEAD = 15 * 60  # keys.publish_ahead of base_config


def epoch(when: str) -> int:
    return calendar.timegm(time.strptime(when, "%Y-%m-%dT%H:%M:%SZ"))


def listed(config_file: Path) -> list[dict[str, str]]:
    result = cli(config_file, "keys", "list", "--json")
    assert result.exit_code == 0, result.output
    rows: list[dict[str, str]] = json.loads(result.stdout)
    return rows


def states(config_file: Path) -> dict[str, str]:
    return {row["kid"]: row["state"] for row in listed(config_file)}


# --- list -------------------------------------------------------------------------------------


def test_list_json_describes_each_key(started: Path) -> None:
    [row] = listed(started)

    assert set(row) == {"kid", "algorithm", "state", "created", "activates", "retires", "removed"}
    assert (row["algorithm"], row["state"]) == ("ES256", "current")
    assert all(WHEN.match(row[field]) for field in ("created", "activates", "retires", "removed"))
    assert epoch(row["activates"]) <= time.time()


def test_list_prints_a_table_with_a_row_per_key(started: Path) -> None:
    [row] = listed(started)

    result = cli(started, "keys", "list")

    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == [
        "kid",
        "algorithm",
        "state",
        "created",
        "activates",
        "retires",
        "removed",
    ]
    assert [line.split() for line in rows] == [[row[h] for h in header.split()]]


def test_list_on_a_database_without_keys_lists_none(
    config_file: Path, config: dict[str, Any]
) -> None:
    engine = make_engine(config["database_url"])
    migrate.upgrade(engine)
    engine.dispose()

    assert listed(config_file) == []


# --- rotate -----------------------------------------------------------------------------------


def test_rotate_publishes_a_next_key_that_signs_after_publish_ahead(started: Path) -> None:
    [old] = states(started)

    result = cli(started, "keys", "rotate", "--json")

    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    rotated = json.loads(result.stdout)
    assert set(rotated) == {"kid", "algorithm", "activates"}
    assert rotated["algorithm"] == "ES256"
    assert abs(epoch(rotated["activates"]) - (time.time() + PUBLISH_AHEAD)) < 60
    assert states(started) == {old: "current", rotated["kid"]: "next"}


def test_rotate_again_returns_the_key_already_published(started: Path) -> None:
    first = json.loads(cli(started, "keys", "rotate", "--json").stdout)

    again = cli(started, "keys", "rotate", "--json")

    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["kid"] == first["kid"]
    assert len(listed(started)) == 2


def test_rotate_prints_the_new_key_and_when_it_signs(started: Path) -> None:
    result = cli(started, "keys", "rotate")

    assert result.exit_code == 0, result.output
    new = next(row for row in listed(started) if row["state"] == "next")
    assert result.stdout == f"new key {new['kid']} (ES256) signs from {new['activates']}\n"


def test_a_key_change_without_actor_is_audited_as_the_operating_system_user(
    started: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOGNAME", "dana")  # getpass.getuser() reads it first
    assert cli(started, "keys", "rotate").exit_code == 0

    result = cli(started, "audit", "search", "--kind", "change", "--json")

    rotations = [row for row in json.loads(result.stdout) if row["decision"] == "key_rotate"]
    assert [row["actor"] for row in rotations] == ["dana"]


def test_rotate_now_signs_with_the_new_key_at_once_and_warns(started: Path) -> None:
    [old] = states(started)

    result = cli(started, "keys", "rotate", "--now", "--json")

    assert result.exit_code == 0, result.output
    new = json.loads(result.stdout)["kid"]
    assert states(started) == {old: "previous", new: "current"}
    [warning] = result.stderr.splitlines()
    assert warning.startswith("warning: --now skips publish-ahead")


# --- retire -----------------------------------------------------------------------------------


def test_retiring_the_signing_key_makes_another_sign_and_warns(started: Path) -> None:
    [old] = states(started)

    result = cli(started, "keys", "retire", old, "--json")

    assert result.exit_code == 0, result.output
    outcome = json.loads(result.stdout)
    assert outcome["retired"] == old
    assert outcome["signing"] not in (None, old)
    assert states(started) == {old: "previous", outcome["signing"]: "current"}
    [warning] = result.stderr.splitlines()
    assert warning.startswith("warning: the retired key was signing")


def test_retiring_a_key_that_does_not_sign_changes_nothing_that_signs(started: Path) -> None:
    [current] = states(started)
    upcoming = json.loads(cli(started, "keys", "rotate", "--json").stdout)["kid"]

    result = cli(started, "keys", "retire", upcoming)

    assert result.exit_code == 0, result.output
    assert result.stdout == f"key {upcoming} retired; {current} signs\n"
    assert result.stderr == ""
    assert states(started) == {current: "current", upcoming: "previous"}


def test_retiring_an_unknown_key_is_a_one_line_error(started: Path) -> None:
    result = cli(started, "keys", "retire", "no-such-kid")

    assert result.exit_code == 1
    assert one_line_error(result) == "sidecar: error: no key no-such-kid"
    assert len(listed(started)) == 1


def test_a_kid_starting_with_a_dash_is_taken_as_the_kid(started: Path) -> None:
    result = cli(started, "keys", "retire", "-Xy_z")

    assert result.exit_code == 1  # not a usage error (2): the kid was looked up
    assert one_line_error(result) == "sidecar: error: no key -Xy_z"


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["list"], ["rotate"], ["retire", "kid"]])
def test_every_keys_command_on_an_unmigrated_database_says_to_upgrade(
    config_file: Path, command: list[str]
) -> None:
    result = cli(config_file, "keys", *command)

    assert result.exit_code == 1
    assert "run `sidecar db upgrade`" in one_line_error(result)


def test_an_invalid_configuration_exits_2_naming_the_key(
    tmp_path: Path, config: dict[str, Any]
) -> None:
    config["keys"]["rotate_every"] = "soon"
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(yaml.safe_dump(config))

    result = cli(config_file, "keys", "list")

    assert result.exit_code == 2
    assert one_line_error(result).startswith("sidecar: error: invalid configuration: keys.")


def test_a_database_file_that_is_not_a_database_is_a_one_line_error(
    config_file: Path, tmp_path: Path
) -> None:
    (tmp_path / "sidecar.db").write_bytes(b"not a database at all" * 100)

    result = cli(config_file, "keys", "list")

    assert result.exit_code == 1
    assert one_line_error(result).startswith("sidecar: error: database error: DatabaseError")


def test_without_a_configuration_the_command_says_how_to_give_one() -> None:
    result = invoke("keys", "list")

    assert result.exit_code == 2
    assert one_line_error(result) == (
        "sidecar: error: no configuration: pass --config PATH or set SIDECAR_CONFIG"
    )
