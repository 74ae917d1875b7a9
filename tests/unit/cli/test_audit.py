"""`sidecar audit tail|search` (sidecar/cli/audit.py), in-process: RFC 3339 times, filters from
the command line, JSON for tooling, one-line errors."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner, Result

from sidecar.audit import DENIED, GRANTED, AuditEvent
from sidecar.cli import main
from sidecar.config import settings_from_mapping
from tests.conftest import make_services

AT = datetime.datetime(2026, 12, 7, 4, 0, tzinfo=datetime.UTC).timestamp()


def run(config_file: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--config", str(config_file), "audit", *args])


def recorded(config: dict[str, Any], tmp_path: Path) -> Path:
    services = make_services(settings_from_mapping(config, env={}))
    for event in (
        AuditEvent(at=AT, decision=GRANTED, client_id="gateway", subject="alice",
                   audiences=["https://code-search.internal/mcp"], jti="j-1", expires_at=AT + 120),
        AuditEvent(at=AT + 60, decision=DENIED, error="invalid_target", client_id="gateway",
                   subject="bob", audiences=["https://payroll.internal/mcp"], reason="no policy"),
    ):  # fmt: skip
        services.audit.record(event)
    services.close()
    config_file = tmp_path / "sidecar.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return config_file


def test_tail_prints_the_newest_first_with_rfc3339_times(
    config: dict[str, Any], tmp_path: Path
) -> None:
    result = run(recorded(config, tmp_path), "tail", "-n", "50")

    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    # The key and policy changes that set the service up come first (newer); then the exchanges.
    changes = [row for row in rows if row.split()[1] in ("key_generate", "policy_create")]
    assert rows[: len(changes)] == changes
    newest, oldest = rows[len(changes) :]
    assert header.split()[:3] == ["at", "decision", "error"]
    assert newest.startswith("2026-12-07T04:01:00.000Z  denied")
    assert oldest.startswith("2026-12-07T04:00:00.000Z  granted")


def test_search_filters_and_prints_json(config: dict[str, Any], tmp_path: Path) -> None:
    config_file = recorded(config, tmp_path)

    result = run(
        config_file,
        "search",
        "--since",
        "2026-12-07T03:59:00Z",
        "--outcome",
        "granted",
        "--audience",
        "https://code-search.internal/mcp",
        "--json",
    )

    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert (row["subject"], row["jti"]) == ("alice", "j-1")
    assert row["at"] == "2026-12-07T04:00:00.000Z"
    assert row["expires_at"] == "2026-12-07T04:02:00.000Z"


def test_search_refuses_a_time_without_a_zone(config: dict[str, Any], tmp_path: Path) -> None:
    result = run(recorded(config, tmp_path), "search", "--since", "2026-12-07T04:00:00")

    assert result.exit_code == 2
    assert "has no time zone" in result.stderr


def test_search_by_kind_change_lists_key_and_policy_changes_with_their_actor(
    config: dict[str, Any], tmp_path: Path
) -> None:
    config_file = recorded(config, tmp_path)
    rotated = CliRunner().invoke(
        main, ["--config", str(config_file), "keys", "rotate", "--actor", "ops", "--json"]
    )
    assert rotated.exit_code == 0, rotated.output

    result = run(config_file, "search", "--kind", "change", "--json")

    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert (found[0]["decision"], found[0]["kid"], found[0]["actor"]) == (
        "key_rotate",
        json.loads(rotated.stdout)["kid"],
        "ops",
    )
    decisions = {row["decision"] for row in found}
    assert decisions == {"key_rotate", "key_generate", "policy_create"}
    assert {row["actor"] for row in found if row["decision"] == "policy_create"} == {"bootstrap"}
    exchanges = json.loads(run(config_file, "search", "--kind", "exchange", "--json").stdout)
    assert sorted(row["decision"] for row in exchanges) == [DENIED, GRANTED]
