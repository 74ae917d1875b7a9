"""``sidecar policy show|enable|disable|delete|export|diff``, ``history --from/--to``, the
warnings of ``apply`` over changes no policy file made, and who a change is recorded as
(sidecar/cli/policy.py), in-process through click on a SQLite file. tests/unit/cli/test_policy.py
covers list, apply, history and rollback; tests/functional/http/test_policy_parity.py runs these
beside the admin API."""

from __future__ import annotations

import getpass
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.orm import sessionmaker

from sidecar.cli.policy import EXIT_DIFFERS
from sidecar.cli.policy_apply import NOT_BY_APPLY
from sidecar.config import load_settings
from sidecar.store.db import make_engine
from sidecar.store.policies import PolicyStore
from tests.conftest import CODE_SEARCH, TICKETS, write_config
from tests.unit.support import cli, one_line_error

TICKETS_POLICY = f"gateway -> {TICKETS}"
CODE_SEARCH_POLICY = f"gateway -> {CODE_SEARCH}"
OS_USER = "dana"
WIKI: dict[str, Any] = {
    "name": "wiki",
    "client_id": "gateway",
    "audience": "https://wiki.internal/mcp",
    "scopes": ["wiki.read", "wiki.write"],
    "default_scopes": ["wiki.read"],
    "ttl": 60,
}


@pytest.fixture(autouse=True)
def os_user(monkeypatch: pytest.MonkeyPatch) -> str:
    """The operating-system user every command here runs as (getpass reads LOGNAME first)."""
    monkeypatch.setenv("LOGNAME", OS_USER)
    return OS_USER


def ok(config_file: Path, *args: str, exit_code: int = 0) -> Any:
    result = cli(config_file, *args)
    assert result.exit_code == exit_code, result.output
    return result


def history(config_file: Path, name: str) -> list[dict[str, Any]]:
    versions: list[dict[str, Any]] = json.loads(
        ok(config_file, "policy", "history", name, "--json").stdout
    )
    return versions


def documents(config_file: Path) -> dict[str, dict[str, Any]]:
    listed = json.loads(ok(config_file, "policy", "list", "--json").stdout)
    return {d["name"]: d for d in listed}


def policy_file(path: Path, *policies: dict[str, Any]) -> Path:
    return write_config(path, {"policies": list(policies)})


@pytest.fixture
def wiki_files(tmp_path: Path) -> tuple[Path, Path]:
    """The wiki policy at ttl 60, and at ttl 30 with one scope fewer."""
    return (
        policy_file(tmp_path / "wiki-1.yaml", WIKI),
        policy_file(tmp_path / "wiki-2.yaml", {**WIKI, "ttl": 30, "scopes": ["wiki.read"]}),
    )


@pytest.fixture
def wiki(started: Path, wiki_files: tuple[Path, Path]) -> Path:
    """``started`` once the wiki policy was applied from the first file, then the second
    (versions 1 and 2)."""
    ok(started, "policy", "apply", str(wiki_files[0]))
    ok(started, "policy", "apply", str(wiki_files[1]))
    return started


# --- who a change is recorded as ----------------------------------------------------------------


def test_a_change_without_actor_is_recorded_as_the_operating_system_user(
    started: Path, wiki_files: tuple[Path, Path]
) -> None:
    ok(started, "policy", "apply", str(wiki_files[0]))
    ok(started, "policy", "disable", "wiki", "--actor", "release-bot")

    assert [v["changed_by"] for v in history(started, "wiki")] == [OS_USER, "release-bot"]


def test_without_a_known_user_the_actor_is_cli(
    started: Path, wiki_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def unknown() -> str:
        raise OSError("no user name")  # as getpass.getuser() fails from Python 3.13 on

    monkeypatch.setattr(getpass, "getuser", unknown)

    ok(started, "policy", "apply", str(wiki_files[0]))

    assert history(started, "wiki")[0]["changed_by"] == "cli"


def test_every_changing_command_says_its_actor_defaults_to_the_user(config_file: Path) -> None:
    for command in (["apply"], ["enable"], ["disable"], ["delete"], ["rollback"]):
        shown = cli(config_file, "policy", *command, "--help").stdout
        assert "[default: (the operating-system user)]" in " ".join(shown.split()), command


# --- show ---------------------------------------------------------------------------------------


def test_show_prints_the_policy_as_a_file_entry_under_its_version(wiki: Path) -> None:
    result = ok(wiki, "policy", "show", "wiki")

    header, *entry = result.stdout.splitlines()
    assert header == f"# version 2, {history(wiki, 'wiki')[1]['changed_at']} by {OS_USER}"
    [shown] = yaml.safe_load("\n".join(entry))
    assert shown == {
        **WIKI,
        "ttl": 30,
        "scopes": ["wiki.read"],
        "enabled": True,
        "require_subject_scopes": False,
        "reuse_tokens": True,
        "copy_claims": [],
    }


def test_show_json_adds_version_and_last_change(wiki: Path) -> None:
    shown = json.loads(ok(wiki, "policy", "show", "wiki", "--json").stdout)

    assert shown == {
        **documents(wiki)["wiki"],
        "updated_at": history(wiki, "wiki")[1]["changed_at"],
        "updated_by": OS_USER,
    }
    assert shown["version"] == 2


def test_show_of_an_unknown_policy_fails(started: Path) -> None:
    result = cli(started, "policy", "show", "nope")

    assert result.exit_code == 1
    assert one_line_error(result) == "sidecar: error: no policy nope"


# --- enable, disable ------------------------------------------------------------------------------


def test_disable_then_enable_record_their_own_actions(started: Path) -> None:
    disabled = ok(started, "policy", "disable", TICKETS_POLICY)
    enabled = ok(started, "policy", "enable", TICKETS_POLICY, "--actor", "erin")

    assert disabled.stdout == f"policy {TICKETS_POLICY} disabled as version 2\n"
    assert enabled.stdout == f"policy {TICKETS_POLICY} enabled as version 3\n"
    versions = history(started, TICKETS_POLICY)
    assert [(v["action"], v["changed_by"], v["policy"]["enabled"]) for v in versions] == [
        ("create", "bootstrap", True),
        ("disable", OS_USER, False),
        ("enable", "erin", True),
    ]
    # Nothing but enabled changed.
    assert {k: v for k, v in versions[1]["policy"].items() if k != "enabled"} == {
        k: v for k, v in versions[0]["policy"].items() if k != "enabled"
    }


def test_disabling_a_disabled_policy_makes_no_version(started: Path) -> None:
    result = ok(started, "policy", "disable", "gateway -> https://disabled.internal/mcp")

    assert result.stdout == (
        "policy gateway -> https://disabled.internal/mcp is already disabled (version 1)\n"
    )
    assert len(history(started, "gateway -> https://disabled.internal/mcp")) == 1


def test_enabling_a_policy_that_would_overlap_is_refused(started: Path, tmp_path: Path) -> None:
    twin = {"name": "twin", "client_id": "gateway", "audience": CODE_SEARCH,
            "scopes": ["code.read"], "enabled": False}  # fmt: skip
    ok(started, "policy", "apply", str(policy_file(tmp_path / "twin.yaml", twin)))

    result = cli(started, "policy", "enable", "twin")

    assert result.exit_code == 1
    assert "could match the same requests" in one_line_error(result)
    assert documents(started)["twin"]["enabled"] is False


@pytest.mark.parametrize("command", ["enable", "disable"])
def test_enable_or_disable_of_an_unknown_policy_fails(started: Path, command: str) -> None:
    result = cli(started, "policy", command, "nope")

    assert result.exit_code == 1
    assert one_line_error(result) == "sidecar: error: no policy nope"


# --- delete -------------------------------------------------------------------------------------


def test_delete_needs_yes_and_changes_nothing_without_it(started: Path) -> None:
    result = cli(started, "policy", "delete", TICKETS_POLICY)

    assert result.exit_code == 2
    assert one_line_error(result) == f"sidecar: error: deleting policy {TICKETS_POLICY} needs --yes"
    assert TICKETS_POLICY in documents(started)


def test_delete_records_the_deletion_and_a_rollback_restores_the_policy(started: Path) -> None:
    deleted = ok(started, "policy", "delete", TICKETS_POLICY, "--yes")

    assert deleted.stdout == (
        f"policy {TICKETS_POLICY} deleted as version 2 "
        f"(`sidecar policy rollback '{TICKETS_POLICY}' --to 1` restores it)\n"
    )
    assert TICKETS_POLICY not in documents(started)
    assert [(v["action"], v["changed_by"]) for v in history(started, TICKETS_POLICY)] == [
        ("create", "bootstrap"),
        ("delete", OS_USER),
    ]
    ok(started, "policy", "rollback", TICKETS_POLICY, "--to", "1")
    assert documents(started)[TICKETS_POLICY]["version"] == 3


def test_delete_of_an_unknown_policy_fails(started: Path) -> None:
    result = cli(started, "policy", "delete", "nope", "--yes")

    assert result.exit_code == 1
    assert one_line_error(result) == "sidecar: error: no policy nope"


# --- export ---------------------------------------------------------------------------------------


def test_export_is_every_policy_sorted_by_name_without_versions(wiki: Path) -> None:
    exported = yaml.safe_load(ok(wiki, "policy", "export").stdout)

    listed = documents(wiki)
    assert list(exported) == ["policies"]
    assert [p["name"] for p in exported["policies"]] == sorted(listed)
    assert exported["policies"] == [
        {k: v for k, v in listed[name].items() if k != "version"} for name in sorted(listed)
    ]


def test_an_export_applied_as_it_is_changes_nothing(
    started: Path, tmp_path: Path, config: dict[str, Any]
) -> None:
    # Every kind of field, and a value that a policy file would read as a variable.
    tricky = {**WIKI, "issuer": config["trusted_issuers"][0]["issuer"], "copy_claims": ["email"],
              "subject": {"tenant": {"one_of": ["acme", 7, True]}, "note": {"equals": "$${X}"}},
              "require_subject_scopes": True, "reuse_tokens": False}  # fmt: skip
    ok(started, "policy", "apply", str(policy_file(tmp_path / "tricky.yaml", tricky)))
    assert documents(started)["wiki"]["subject"]["note"] == {"equals": "${X}"}
    exported = tmp_path / "exported.yaml"

    written = ok(started, "policy", "export", "--output", str(exported))
    applied = ok(started, "policy", "apply", str(exported), "--prune", "--json")

    assert written.stdout == f"6 policy(ies) written to {exported}\n"
    assert json.loads(applied.stdout)["changes"] == []
    assert ok(started, "policy", "diff", str(exported)).stdout.endswith(
        "0 change(s), 6 unchanged, 0 only in the database\n"
    )


def test_list_json_wrapped_in_policies_is_still_refused_where_export_is_taken(
    started: Path, tmp_path: Path
) -> None:
    # What the issue tried: `list --json` carries versions, which a policy file may not.
    listed = json.loads(ok(started, "policy", "list", "--json").stdout)
    wrapped = policy_file(tmp_path / "listed.yaml", *listed)

    assert cli(started, "policy", "apply", str(wrapped)).exit_code == 2


# --- history between two versions -----------------------------------------------------------------


def test_history_from_to_prints_the_fields_that_differ(wiki: Path) -> None:
    result = ok(wiki, "policy", "history", "wiki", "--from", "1", "--to", "2")

    assert result.stdout.splitlines() == [
        "policy wiki: version 1 -> 2",
        '    scopes: ["wiki.read", "wiki.write"] -> ["wiki.read"]',
        "    ttl: 60 -> 30",
    ]


def test_history_from_to_json_lists_each_field_before_and_after(wiki: Path) -> None:
    result = ok(wiki, "policy", "history", "wiki", "--from", "2", "--to", "1", "--json")

    assert json.loads(result.stdout) == {
        "name": "wiki",
        "from": 2,
        "to": 1,
        "changes": [
            {"field": "scopes", "before": ["wiki.read"], "after": ["wiki.read", "wiki.write"]},
            {"field": "ttl", "before": 30, "after": 60},
        ],
    }


def test_history_from_to_of_one_version_finds_no_difference(wiki: Path) -> None:
    result = ok(wiki, "policy", "history", "wiki", "--from", "2", "--to", "2")

    assert result.stdout.splitlines() == ["policy wiki: version 2 -> 2", "    (no field differs)"]


def test_history_from_to_of_a_missing_version_fails(wiki: Path) -> None:
    result = cli(wiki, "policy", "history", "wiki", "--from", "1", "--to", "9")

    assert result.exit_code == 1
    assert one_line_error(result) == "sidecar: error: policy wiki has no version 9"


def test_history_needs_both_from_and_to(wiki: Path) -> None:
    result = cli(wiki, "policy", "history", "wiki", "--from", "1")

    assert result.exit_code == 2
    assert one_line_error(result) == "sidecar: error: give both --from and --to, or neither"


def test_history_of_an_unknown_policy_says_there_is_none(started: Path) -> None:
    for command in (["nope"], ["nope", "--from", "1", "--to", "2"]):
        result = cli(started, "policy", "history", *command)

        assert result.exit_code == 1
        assert one_line_error(result) == "sidecar: error: no policy nope"


# --- apply and dry-run of a creation --------------------------------------------------------------


def test_dry_run_of_a_creation_prints_the_new_policy_field_by_field(
    started: Path, wiki_files: tuple[Path, Path]
) -> None:
    result = ok(started, "policy", "apply", str(wiki_files[0]), "--dry-run", exit_code=3)

    assert result.stdout.splitlines() == [
        "would create: wiki",
        '    client_id: "gateway"',
        '    audience: "https://wiki.internal/mcp"',
        '    scopes: ["wiki.read", "wiki.write"]',
        '    default_scopes: ["wiki.read"]',
        "    ttl: 60",
        "    enabled: true",
        "    require_subject_scopes: false",
        "    reuse_tokens: true",
        "    copy_claims: []",
        "1 change(s), 0 unchanged",
    ]
    assert "wiki" not in documents(started)


def test_apply_json_of_a_creation_holds_the_new_policy(
    started: Path, wiki_files: tuple[Path, Path]
) -> None:
    result = ok(started, "policy", "apply", str(wiki_files[0]), "--json")

    [created] = json.loads(result.stdout)["changes"]
    assert created["after"] == {k: v for k, v in documents(started)["wiki"].items()
                                if k != "version"}  # fmt: skip


# --- diff FILE ----------------------------------------------------------------------------------


def test_diff_of_a_file_the_table_matches_exits_0(started: Path) -> None:
    result = ok(started, "policy", "diff", str(started))

    assert result.stdout == "0 change(s), 5 unchanged, 0 only in the database\n"
    assert result.stderr == ""


def test_diff_shows_what_apply_would_change_and_what_only_the_database_has(
    wiki: Path, wiki_files: tuple[Path, Path]
) -> None:
    before = documents(wiki)

    result = ok(wiki, "policy", "diff", str(wiki_files[0]), exit_code=EXIT_DIFFERS)

    lines = result.stdout.splitlines()
    assert lines[:3] == [
        "would update: wiki",
        '    scopes: ["wiki.read"] -> ["wiki.read", "wiki.write"]',
        "    ttl: 30 -> 60",
    ]
    only = [line for line in lines if line.startswith("only in the database: ")]
    assert len(only) == 5
    assert f"only in the database: {TICKETS_POLICY} (apply --prune would delete it)" in only
    assert lines[-1] == "1 change(s), 0 unchanged, 5 only in the database"
    assert documents(wiki) == before


def test_diff_with_prune_shows_deletions_and_exits_3(
    started: Path, tmp_path: Path, config: dict[str, Any]
) -> None:
    kept = [p for p in config["policies"] if p["audience"] != TICKETS]
    result = ok(started, "policy", "diff", str(policy_file(tmp_path / "p.yaml", *kept)),
                "--prune", "--json", exit_code=3)  # fmt: skip

    report = json.loads(result.stdout)
    assert report["identical"] is False
    assert [(c["action"], c["name"]) for c in report["changes"]] == [("delete", TICKETS_POLICY)]
    assert report["changes"][0]["before"]["ttl"] == 60
    assert (report["unchanged"], report["only_in_database"], report["warnings"]) == (4, [], [])


def test_a_database_only_policy_alone_makes_the_table_differ(
    started: Path, tmp_path: Path, config: dict[str, Any]
) -> None:
    kept = [p for p in config["policies"] if p["audience"] != TICKETS]

    result = ok(started, "policy", "diff", str(policy_file(tmp_path / "p.yaml", *kept)),
                "--json", exit_code=3)  # fmt: skip

    report = json.loads(result.stdout)
    assert (report["identical"], report["changes"]) == (False, [])
    assert report["only_in_database"] == [TICKETS_POLICY]


def test_diff_of_an_invalid_file_exits_2(started: Path, tmp_path: Path) -> None:
    bad = policy_file(tmp_path / "bad.yaml", {**WIKI, "scopes": ["*"]})

    result = cli(started, "policy", "diff", str(bad))

    assert result.exit_code == 2
    assert one_line_error(result).startswith("sidecar: error: invalid policies: ")


# --- drift: apply over a change no policy file made --------------------------------------------


def test_a_rollback_then_apply_dry_run_of_the_newer_file_warns(
    wiki: Path, wiki_files: tuple[Path, Path]
) -> None:
    ok(wiki, "policy", "rollback", "wiki", "--to", "1", "--actor", "carol")
    rolled_back = history(wiki, "wiki")[-1]

    result = ok(wiki, "policy", "apply", str(wiki_files[1]), "--dry-run", exit_code=3)

    assert result.stderr.splitlines() == [
        f"warning: policy wiki: version 3 was a rollback by carol at {rolled_back['changed_at']}; "
        f"applying {wiki_files[1]} undoes it"
    ]
    assert result.stdout.splitlines()[0] == "would update: wiki"


def test_apply_warns_and_still_applies(wiki: Path, wiki_files: tuple[Path, Path]) -> None:
    ok(wiki, "policy", "disable", "wiki", "--actor", "oncall")

    result = ok(wiki, "policy", "apply", str(wiki_files[1]), "--json")

    [warning] = result.stderr.splitlines()
    assert "version 3 was a disable by oncall at " in warning
    assert json.loads(result.stdout)["warnings"] == [warning]  # in the report too, for CI
    assert documents(wiki)["wiki"]["enabled"] is True
    assert history(wiki, "wiki")[-1]["action"] == "update"


def test_diff_warns_as_apply_does(wiki: Path, wiki_files: tuple[Path, Path]) -> None:
    ok(wiki, "policy", "disable", "wiki")
    ok(wiki, "policy", "enable", "wiki")

    dry_run = ok(wiki, "policy", "apply", str(wiki_files[0]), "--dry-run", exit_code=3)
    diff = ok(wiki, "policy", "diff", str(wiki_files[0]), "--json", exit_code=3)

    [warning] = dry_run.stderr.splitlines()
    assert f"version 4 was an enable by {OS_USER} at " in warning
    assert json.loads(diff.stdout)["warnings"] == [warning]
    assert diff.stderr.splitlines() == [warning]


def test_recreating_a_deleted_policy_warns(wiki: Path, wiki_files: tuple[Path, Path]) -> None:
    ok(wiki, "policy", "delete", "wiki", "--yes", "--actor", "frank")

    result = ok(wiki, "policy", "apply", str(wiki_files[1]), "--dry-run", exit_code=3)

    assert "policy wiki: version 3 was a delete by frank at " in result.stderr


def test_pruning_a_policy_an_admin_changed_warns(
    started: Path, tmp_path: Path, config: dict[str, Any]
) -> None:
    # As the admin API records it (the command line may not pass for admin:NAME).
    settings = load_settings(started)
    engine = make_engine(settings.database_url)
    try:
        PolicyStore(sessionmaker(engine), time.time).set_enabled(
            TICKETS_POLICY, False, actor="admin:ops"
        )
    finally:
        engine.dispose()
    kept = [p for p in config["policies"] if p["audience"] != TICKETS]

    result = ok(started, "policy", "apply", str(policy_file(tmp_path / "p.yaml", *kept)),
                "--prune", "--dry-run", exit_code=3)  # fmt: skip

    assert f"policy {TICKETS_POLICY}: version 2 was a disable by admin:ops" in result.stderr


def test_changes_made_by_applying_files_do_not_warn(
    wiki: Path, wiki_files: tuple[Path, Path]
) -> None:
    result = ok(wiki, "policy", "apply", str(wiki_files[0]), "--dry-run", exit_code=3)

    assert result.stderr == ""


def test_a_file_that_matches_a_rolled_back_policy_does_not_warn(
    wiki: Path, wiki_files: tuple[Path, Path]
) -> None:
    ok(wiki, "policy", "rollback", "wiki", "--to", "1")

    result = ok(wiki, "policy", "apply", str(wiki_files[0]), "--dry-run")

    assert result.stderr == ""  # nothing would change, so nothing is undone


def test_the_changes_apply_warns_it_would_undo_are_the_ones_a_file_never_makes() -> None:
    # A policy file creates, updates and deletes; a newest version made any other way (or by
    # an admin: actor) is what applying a file would silently undo.
    assert frozenset({"rollback", "enable", "disable"}) == NOT_BY_APPLY
