"""``sidecar policy list|apply|history|rollback`` (sidecar/cli/policy.py), in-process through
click, on a SQLite file. tests/functional/test_cli.py runs the installed command and covers the
dry-run diffs; these drive each command function and read the table back with ``policy list
--json`` and ``policy history --json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sidecar.cli.policy import EXIT_DIFFERS
from sidecar.config import load_settings
from tests.conftest import CODE_SEARCH, DISABLED, TICKETS, TestIdP, make_services, write_config
from tests.unit.support import cli, one_line_error

CODE_SEARCH_POLICY = f"gateway -> {CODE_SEARCH}"
TICKETS_POLICY = f"gateway -> {TICKETS}"
WIKI = "https://wiki.internal/mcp"


def documents(config_file: Path) -> dict[str, dict[str, Any]]:
    """The policy table by name, as ``policy list --json`` prints it."""
    result = cli(config_file, "policy", "list", "--json")
    assert result.exit_code == 0, result.output
    return {d["name"]: d for d in json.loads(result.stdout)}


def history(config_file: Path, name: str) -> list[dict[str, Any]]:
    result = cli(config_file, "policy", "history", name, "--json")
    assert result.exit_code == 0, result.output
    versions: list[dict[str, Any]] = json.loads(result.stdout)
    return versions


@pytest.fixture
def os_user(monkeypatch: pytest.MonkeyPatch) -> str:
    """The operating-system user the commands run as (getpass reads LOGNAME first): the actor
    of a change made without --actor."""
    monkeypatch.setenv("LOGNAME", "dana")
    return "dana"


@pytest.fixture
def kept(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The configuration's policies but TICKETS's."""
    return [p for p in config["policies"] if p["audience"] != TICKETS]


@pytest.fixture
def without_tickets(kept: list[dict[str, Any]], tmp_path: Path) -> Path:
    """A policies file of the configuration's policies but TICKETS's."""
    return write_config(tmp_path / "policies.yaml", {"policies": kept})


@pytest.fixture
def pruned(started: Path, without_tickets: Path) -> Path:
    """``started`` once ``policy apply --prune`` of ``without_tickets`` deleted TICKETS's
    policy."""
    result = cli(started, "policy", "apply", str(without_tickets), "--prune")
    assert result.exit_code == 0, result.output
    return started


def wiki_policy() -> dict[str, Any]:
    return {"name": "wiki", "client_id": "gateway", "audience": WIKI, "scopes": ["wiki.read"]}


# --- list -------------------------------------------------------------------------------------


def test_list_json_holds_every_policy_document_with_its_version(
    started: Path, config: dict[str, Any]
) -> None:
    listed = documents(started)

    assert len(listed) == len(config["policies"])
    assert all(d["version"] == 1 for d in listed.values())
    tickets = listed[TICKETS_POLICY]
    assert (tickets["client_id"], tickets["audience"], tickets["ttl"]) == ("gateway", TICKETS, 60)
    assert tickets["require_subject_scopes"] is True
    assert listed[f"gateway -> {DISABLED}"]["enabled"] is False


def test_list_table_shows_the_subject_conditions_of_a_policy(
    tmp_path: Path, config: dict[str, Any], idp: TestIdP
) -> None:
    config["policies"].append(
        {
            **wiki_policy(),
            "issuer": idp.issuer,
            "subject": {"groups": {"contains": "eng"}, "mfa": {"equals": True}},
        }
    )
    config_file = write_config(tmp_path / "conditions.yaml", config)
    make_services(load_settings(config_file)).close()

    result = cli(config_file, "policy", "list")

    assert result.exit_code == 0, result.output
    [wiki] = [line for line in result.stdout.splitlines() if line.startswith("wiki ")]
    assert f'iss={idp.issuer}; groups contains "eng"; mfa equals true' in wiki
    [tickets] = [line for line in result.stdout.splitlines() if line.startswith(TICKETS_POLICY)]
    assert tickets.split()[5:] == ["-", "tickets.read", "tickets.read", "60", "yes", "mint"]


# --- apply ------------------------------------------------------------------------------------


def test_apply_creates_the_policies_of_the_file_then_finds_nothing_to_change(
    migrated: Path, config: dict[str, Any]
) -> None:
    first = cli(migrated, "policy", "apply", str(migrated), "--json")
    second = cli(migrated, "policy", "apply", str(migrated), "--json")

    assert first.exit_code == 0, first.output
    created = json.loads(first.stdout)
    assert created["dry_run"] is False
    assert {c["action"] for c in created["changes"]} == {"create"}
    assert len(created["changes"]) == len(config["policies"])
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout) == {
        "dry_run": False,
        "changes": [],
        "unchanged": len(config["policies"]),
        "warnings": [],
    }
    assert set(documents(migrated)) == {c["name"] for c in created["changes"]}


def test_apply_accepts_a_file_of_policies_only(
    started: Path, tmp_path: Path, config: dict[str, Any]
) -> None:
    policies = write_config(
        tmp_path / "policies.yaml", {"policies": [*config["policies"], wiki_policy()]}
    )

    result = cli(started, "policy", "apply", str(policies))

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert (lines[0], lines[-1]) == ("create: wiki", "1 change(s), 5 unchanged")
    assert '    scopes: ["wiki.read"]' in lines  # the new policy's fields
    assert documents(started)["wiki"]["scopes"] == ["wiki.read"]


def test_apply_without_prune_keeps_policies_missing_from_the_file(
    started: Path, without_tickets: Path
) -> None:
    result = cli(started, "policy", "apply", str(without_tickets))

    assert result.exit_code == 0, result.output
    assert TICKETS_POLICY in documents(started)


def test_apply_with_prune_deletes_policies_missing_from_the_file_and_records_it(
    started: Path, without_tickets: Path, kept: list[dict[str, Any]]
) -> None:
    result = cli(started, "policy", "apply", str(without_tickets), "--prune", "--actor", "ci")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"delete: {TICKETS_POLICY}",
        f"1 change(s), {len(kept)} unchanged",
    ]
    assert TICKETS_POLICY not in documents(started)
    deleted = history(started, TICKETS_POLICY)[-1]
    assert (deleted["action"], deleted["changed_by"]) == ("delete", "ci")


def test_dry_run_exits_3_when_something_would_change_and_changes_nothing(
    started: Path, tmp_path: Path, kept: list[dict[str, Any]]
) -> None:
    policies = write_config(tmp_path / "policies.yaml", {"policies": [*kept, wiki_policy()]})
    before = documents(started)

    result = cli(started, "policy", "apply", str(policies), "--dry-run", "--prune", "--json")

    assert result.exit_code == EXIT_DIFFERS == 3
    report = json.loads(result.stdout)
    assert report["dry_run"] is True
    assert sorted((c["action"], c["name"]) for c in report["changes"]) == [
        ("create", "wiki"),
        ("delete", TICKETS_POLICY),
    ]
    assert documents(started) == before
    assert len(history(started, TICKETS_POLICY)) == 1


def test_dry_run_exits_0_when_the_table_already_matches(started: Path) -> None:
    result = cli(started, "policy", "apply", str(started), "--dry-run", "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["changes"] == []


def test_an_invalid_policy_file_exits_2_and_changes_nothing(
    started: Path, tmp_path: Path, config: dict[str, Any]
) -> None:
    config["policies"][0]["ttl"] = 30  # a valid change beside an invalid policy
    bad = [*config["policies"], {"client_id": "gateway", "audience": WIKI, "scopes": "wiki.read"}]
    policies = write_config(tmp_path / "policies.yaml", {"policies": bad})
    before = documents(started)

    result = cli(started, "policy", "apply", str(policies))

    assert result.exit_code == 2
    line = one_line_error(result)
    # Where the user wrote it: the file, the line, the policy by name, the entry and the key.
    assert line.startswith(f"sidecar: error: invalid policies: {policies}, line ")
    assert f': policy "gateway -> {WIKI}", policies[5].scopes: ' in line
    assert documents(started) == before


def test_a_file_without_policies_exits_2(started: Path, tmp_path: Path) -> None:
    empty = write_config(tmp_path / "empty.yaml", {"issuer": "https://elsewhere.example"})

    result = cli(started, "policy", "apply", str(empty))

    assert result.exit_code == 2
    assert "no 'policies' key" in one_line_error(result)


def test_two_policies_of_one_name_exit_2(
    started: Path, tmp_path: Path, config: dict[str, Any]
) -> None:
    twins = [
        wiki_policy(),
        {**wiki_policy(), "audience": "https://other-wiki.internal/mcp"},
    ]
    policies = write_config(tmp_path / "policies.yaml", {"policies": [*config["policies"], *twins]})

    result = cli(started, "policy", "apply", str(policies))

    assert result.exit_code == 2
    line = one_line_error(result)
    assert line.startswith(f'sidecar: error: invalid policies: policy "wiki" ({policies}, line ')
    assert f"the name is already used by the policy at {policies}, line " in line
    assert "wiki" not in documents(started)


def test_a_missing_policy_file_is_a_usage_error(started: Path, tmp_path: Path) -> None:
    result = cli(started, "policy", "apply", str(tmp_path / "absent.yaml"))

    assert result.exit_code == 2
    assert "does not exist" in result.stderr


# --- history and rollback ---------------------------------------------------------------------


def test_history_table_has_a_row_per_version(
    started: Path, tmp_path: Path, config: dict[str, Any]
) -> None:
    config["policies"][1]["enabled"] = False
    write_config(tmp_path / "policies.yaml", {"policies": config["policies"]})
    cli(started, "policy", "apply", str(tmp_path / "policies.yaml"), "--actor", "bob")

    result = cli(started, "policy", "history", TICKETS_POLICY)

    assert result.exit_code == 0, result.output
    header, first, second = result.stdout.splitlines()
    assert header.split() == ["version", "action", "changed_at", "changed_by", "policy"]
    assert first.split()[:2] == ["1", "create"]
    assert "enabled=yes" in first
    assert second.split()[:2] == ["2", "update"]
    assert second.split()[3] == "bob"
    assert "scopes=tickets.read ttl=60 enabled=no subject=-" in second


def test_rollback_after_a_prune_brings_the_policy_back_as_a_new_version(
    os_user: str, pruned: Path
) -> None:
    result = cli(pruned, "policy", "rollback", TICKETS_POLICY, "--to", "1", "--actor", "carol")

    assert result.exit_code == 0, result.output
    assert result.stdout == f"policy {TICKETS_POLICY} restored to version 1 as version 3\n"
    assert documents(pruned)[TICKETS_POLICY]["ttl"] == 60
    versions = history(pruned, TICKETS_POLICY)
    assert [(v["action"], v["changed_by"]) for v in versions] == [
        ("create", "bootstrap"),
        ("delete", os_user),
        ("rollback", "carol"),
    ]
    assert versions[2]["policy"] == versions[0]["policy"]


def test_rollback_to_a_deletion_is_refused(pruned: Path) -> None:
    result = cli(pruned, "policy", "rollback", TICKETS_POLICY, "--to", "2")

    assert result.exit_code == 1
    assert one_line_error(result) == (
        f"sidecar: error: version 2 of policy {TICKETS_POLICY} is its deletion"
    )
    assert TICKETS_POLICY not in documents(pruned)


def test_rollback_of_an_unknown_policy_fails(started: Path) -> None:
    result = cli(started, "policy", "rollback", "nope", "--to", "1")

    assert result.exit_code == 1
    assert one_line_error(result) == "sidecar: error: no policy nope"


def test_rollback_to_a_version_a_policy_does_not_have_fails(started: Path) -> None:
    result = cli(started, "policy", "rollback", CODE_SEARCH_POLICY, "--to", "2")

    assert result.exit_code == 1
    assert one_line_error(result) == f"sidecar: error: policy {CODE_SEARCH_POLICY} has no version 2"


def test_rollback_needs_the_version(started: Path) -> None:
    result = cli(started, "policy", "rollback", CODE_SEARCH_POLICY)

    assert result.exit_code == 2
    assert "--to" in result.stderr
    assert len(history(started, CODE_SEARCH_POLICY)) == 1


# --- configuration errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["list"], ["history", CODE_SEARCH_POLICY], ["rollback", CODE_SEARCH_POLICY, "--to", "1"]],
    ids=["list", "history", "rollback"],
)
def test_an_invalid_configuration_exits_2(
    tmp_path: Path, config: dict[str, Any], command: list[str]
) -> None:
    config["tokens"]["algorithm"] = "HS256"
    bad = write_config(tmp_path / "bad.yaml", config)

    result = cli(bad, "policy", *command)

    assert result.exit_code == 2
    assert one_line_error(result).startswith(
        "sidecar: error: invalid configuration: tokens.algorithm"
    )


def test_apply_on_an_unmigrated_database_says_to_upgrade(config_file: Path) -> None:
    result = cli(config_file, "policy", "apply", str(config_file))

    assert result.exit_code == 1
    assert "run `sidecar db upgrade`" in one_line_error(result)


def test_an_overlap_with_a_policy_only_the_database_has_names_both_and_suggests_prune(
    started: Path, tmp_path: Path, config: dict[str, Any]
) -> None:
    # The file renames the first policy: without --prune the old name stays in the database
    # and overlaps the new one.
    renamed = [{**config["policies"][0], "name": "code search"}, *config["policies"][1:]]
    policies = write_config(tmp_path / "policies.yaml", {"policies": renamed})
    old_name = f"gateway -> {config['policies'][0]['audience']}"

    refused = cli(started, "policy", "apply", str(policies))
    pruned = cli(started, "policy", "apply", str(policies), "--prune")

    line = one_line_error(refused)
    assert f'policy "code search" ({policies}, line 2)' in line
    assert f'policy "{old_name}" (in the database, not in {policies})' in line
    assert "`policy apply --prune` deletes" in line
    assert pruned.exit_code == 0, pruned.output
