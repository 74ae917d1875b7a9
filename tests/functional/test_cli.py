"""The ``sidecar`` command line (docs/design.md §5), run as a real subprocess as an operator
runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from sidecar.cli import main
from sidecar.config import load_settings
from sidecar.services import Services
from sidecar.store import migrate
from sidecar.store.db import make_engine
from sidecar.web.app import create_app
from tests.conftest import (
    ACCESS_TOKEN_TYPE,
    CODE_SEARCH,
    GATEWAY_SECRET,
    TICKETS,
    LiveServer,
    make_services,
    write_config,
)
from tests.launcher import SIDECAR

REPO_ROOT = Path(__file__).resolve().parents[2]
ENCRYPTION_KEY = "correct horse battery staple"


def run(
    *args: str,
    config: Path | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "SIDECAR_CONFIG"}
    environment.update(env or {})
    command = [*SIDECAR, *(["--config", str(config)] if config else []), *args]
    return subprocess.run(
        command, capture_output=True, text=True, env=environment, cwd=cwd, timeout=60
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """A failed command: non-zero exit, nothing on stdout, exactly one line on stderr."""
    assert result.returncode != 0, result.stdout
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("sidecar: error: ")
    return lines[0]


# Set-up and checks run in-process (a subprocess costs a second of imports); only the command
# under test runs as a subprocess. The set-up: ``config_file``, ``migrated`` and ``started`` of
# tests/conftest.py.


@contextmanager
def stores_of(config_file: Path) -> Iterator[Services]:
    """The stores of ``config_file``'s database, read as the service reads them (nothing
    prepared, nothing written)."""
    services = Services(load_settings(config_file))
    try:
        yield services
    finally:
        services.engine.dispose()


def key_states(config_file: Path) -> dict[str, str]:
    with stores_of(config_file) as services:
        keyring = services.keys.load()
    now = time.time()
    current = keyring.current(now)
    return {
        k.kid: "current" if current is not None and k.kid == current.kid else k.state(now)
        for k in keyring.keys
    }


def policy_ttls(config_file: Path) -> dict[str, int]:
    """The ttl of each of the gateway's policies, by audience."""
    with stores_of(config_file) as services:
        policies = services.policy_store.load()
    return {p.audience: p.ttl for p in policies if p.client_id == "gateway"}


# --- help and configuration -------------------------------------------------------------------

COMMANDS = [
    [],
    ["serve"],
    ["check-config"],
    ["db"],
    ["db", "upgrade"],
    ["keys"],
    ["keys", "list"],
    ["keys", "rotate"],
    ["keys", "retire"],
    ["policy"],
    ["policy", "list"],
    ["policy", "apply"],
    ["policy", "show"],
    ["policy", "diff"],
    ["policy", "export"],
    ["policy", "enable"],
    ["policy", "disable"],
    ["policy", "delete"],
    ["policy", "history"],
    ["policy", "rollback"],
    ["policy", "explain"],
    ["demo-init"],
    ["demo-token"],
]


def test_the_installed_command_prints_help() -> None:
    result = run("policy", "apply", "--help")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: sidecar policy apply [OPTIONS] FILE")
    assert "--dry-run" in result.stdout


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "sidecar")
def test_every_command_has_help(command: list[str]) -> None:
    # In-process through click (the same parser the installed script runs): fourteen
    # subprocesses would cost seconds for nothing the test above does not already cover.
    result = CliRunner().invoke(main, [*command, "--help"], prog_name="sidecar", env={})

    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: {' '.join(['sidecar', *command])} "), command
    assert "Show this message and exit." in result.output


def test_check_config_accepts_a_valid_configuration(config_file: Path) -> None:
    result = run("check-config", config=config_file)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("configuration OK")


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        (("tokens", "algorithm"), "HS256", "tokens.algorithm"),
        (("trusted_issuers", 0, "audiences"), [], "trusted_issuers[0].audiences"),
    ],
)
def test_invalid_configuration_names_the_key_path(
    tmp_path: Path, config: dict[str, Any], path: tuple[Any, ...], value: Any, named: str
) -> None:
    target: Any = config
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    config_file = write_config(tmp_path / "bad.yaml", config)

    result = run("check-config", config=config_file)

    assert result.returncode == 2
    assert named in one_line_error(result)
    assert GATEWAY_SECRET not in result.stderr


def test_missing_environment_variable_is_named(tmp_path: Path, config: dict[str, Any]) -> None:
    config["clients"][0]["client_secret"] = "${SIDECAR_TEST_GATEWAY_SECRET}"
    config_file = write_config(tmp_path / "env.yaml", config)

    missing = run("check-config", config=config_file)
    present = run(
        "check-config", config=config_file, env={"SIDECAR_TEST_GATEWAY_SECRET": GATEWAY_SECRET}
    )

    assert "SIDECAR_TEST_GATEWAY_SECRET" in one_line_error(missing)
    assert "clients[0].client_secret" in missing.stderr
    assert present.returncode == 0, present.stderr


def test_sidecar_config_variable_replaces_the_option(config_file: Path) -> None:
    result = run("check-config", env={"SIDECAR_CONFIG": str(config_file)})

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("configuration OK")


def test_no_configuration_is_an_error() -> None:
    result = run("check-config")

    assert result.returncode == 2
    assert "--config" in one_line_error(result)


def test_unreadable_configuration_file_is_an_error(tmp_path: Path) -> None:
    result = run("check-config", config=tmp_path / "absent.yaml")

    assert result.returncode == 2
    assert "absent.yaml" in one_line_error(result)


# --- database and policies ----------------------------------------------------------------


def test_db_upgrade_migrates_to_the_newest_revision(
    config_file: Path, config: dict[str, Any]
) -> None:
    result = run("db", "upgrade", config=config_file)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"database at revision {migrate.head_revision()}"
    engine = make_engine(config["database_url"])
    try:
        assert migrate.is_current(engine)
    finally:
        engine.dispose()


def test_commands_on_an_unmigrated_database_say_to_upgrade(config_file: Path) -> None:
    for command in (["policy", "list"], ["keys", "rotate"]):
        result = run(*command, config=config_file)

        assert result.returncode == 1, command
        assert "sidecar db upgrade" in one_line_error(result), command


def test_unreachable_database_is_a_one_line_error(tmp_path: Path, config: dict[str, Any]) -> None:
    config["database_url"] = "postgresql+psycopg://nobody:pw-123@127.0.0.1:9/none"
    config_file = write_config(tmp_path / "down.yaml", config)

    result = run("policy", "list", config=config_file)

    assert result.returncode == 1
    assert "database error" in one_line_error(result)
    assert "pw-123" not in result.stderr


def test_policy_apply_prints_each_change_then_none(migrated: Path) -> None:
    first = run("policy", "apply", str(migrated), config=migrated)
    second = run("policy", "apply", str(migrated), config=migrated)

    assert first.returncode == 0, first.stderr
    assert f"create: gateway -> {CODE_SEARCH}" in first.stdout.splitlines()
    assert f"create: gateway -> {TICKETS}" in first.stdout.splitlines()
    assert first.stdout.splitlines()[-1] == "5 change(s), 0 unchanged"
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "0 change(s), 5 unchanged"


@pytest.fixture
def shorter_ttl(started: Path, tmp_path: Path, config: dict[str, Any]) -> Path:
    """A policies file of ``started``'s policies, but for the gateway's CODE_SEARCH ttl: 30, not
    120."""
    config["policies"][0]["ttl"] = 30
    return write_config(tmp_path / "policies.yaml", {"policies": config["policies"]})


def test_policy_apply_dry_run_exits_3_when_something_would_change(
    started: Path, shorter_ttl: Path
) -> None:
    migrated, changed = started, shorter_ttl

    dry_run = run("policy", "apply", str(changed), "--dry-run", config=migrated)

    assert dry_run.returncode == 3, dry_run.stderr
    assert f"would update: gateway -> {CODE_SEARCH}" in dry_run.stdout.splitlines()
    assert policy_ttls(migrated)[CODE_SEARCH] == 120  # nothing changed


def test_policy_apply_dry_run_exits_0_when_nothing_would_change(started: Path) -> None:
    # `started` bootstrapped the policy table from this same file.
    migrated = started

    dry_run = run("policy", "apply", str(migrated), "--dry-run", config=migrated)

    assert dry_run.returncode == 0, dry_run.stderr
    assert dry_run.stdout.strip() == "0 change(s), 5 unchanged"


def test_policy_apply_json_lists_the_changes(migrated: Path) -> None:
    result = run("policy", "apply", str(migrated), "--json", config=migrated)

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["dry_run"] is False
    assert report["unchanged"] == 0
    [created] = [c for c in report["changes"] if c["name"] == f"gateway -> {CODE_SEARCH}"]
    assert {key: created[key] for key in ("action", "client_id", "audience")} == {
        "action": "create",
        "client_id": "gateway",
        "audience": CODE_SEARCH,
    }
    assert created["after"]["scopes"] == ["code.read", "code.search"]  # the new policy


def test_policy_apply_of_an_invalid_file_changes_nothing(
    migrated: Path, tmp_path: Path, config: dict[str, Any]
) -> None:
    policies = config["policies"] + [
        {"client_id": "stranger", "audience": "https://x.internal", "scopes": ["a"]}
    ]
    bad = write_config(tmp_path / "bad-policies.yaml", {"policies": policies})

    result = run("policy", "apply", str(bad), config=migrated)

    assert result.returncode == 2
    line = one_line_error(result)
    assert f'policy "stranger -> https://x.internal" ({bad}, line ' in line
    assert "client_id 'stranger' is not one of the configured clients" in line
    assert policy_ttls(migrated) == {}


def test_policy_list_prints_a_table_and_json(started: Path) -> None:
    table = run("policy", "list", config=started)
    listed = run("policy", "list", "--json", config=started)

    assert table.returncode == 0, table.stderr
    assert listed.returncode == 0, listed.stderr
    documents = json.loads(listed.stdout)
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "name",
        "client_id",
        "audience",
        "subject",
        "scopes",
        "default",
        "ttl",
        "enabled",
        "credential",
    ]
    assert len(lines) == 6
    # The default name is "CLIENT -> AUDIENCE"; then the client and audience columns.
    assert any(
        line.split()[:5] == ["gateway", "->", CODE_SEARCH, "gateway", CODE_SEARCH] for line in lines
    )
    assert len(documents) == 5
    code_search = next(
        d for d in documents if (d["client_id"], d["audience"]) == ("gateway", CODE_SEARCH)
    )
    assert code_search["scopes"] == ["code.read", "code.search"]
    assert code_search["default_scopes"] == ["code.read"]
    assert code_search["ttl"] == 120
    assert code_search["enabled"] is True
    assert code_search["require_subject_scopes"] is False
    assert code_search["reuse_tokens"] is True
    assert code_search["copy_claims"] == ["email"]


# Apply, history and rollback in-process through click (the parser the installed script runs):
# the subprocess tests above already cover the installed command and its exit statuses.


def cli(config_file: Path, *args: str) -> Any:
    return CliRunner().invoke(main, ["--config", str(config_file), *args], env={})


def test_policy_apply_dry_run_prints_field_level_diffs_and_changes_nothing(
    started: Path, tmp_path: Path, config: dict[str, Any]
) -> None:
    code_search = config["policies"][0]
    code_search.update(
        ttl=30,
        scopes=["code.read"],
        subject={"groups": {"contains": "eng"}},
        copy_claims=[],
        reuse_tokens=False,
    )
    policies = [
        code_search,
        *config["policies"][2:],  # TICKETS left out: pruned
        {"name": "wiki", "client_id": "gateway", "audience": "https://wiki.internal/mcp",
         "scopes": ["wiki.read"]},
    ]  # fmt: skip
    changed = write_config(tmp_path / "policies.yaml", {"policies": policies})

    result = cli(started, "policy", "apply", str(changed), "--dry-run", "--prune")

    assert result.exit_code == 3, result.output
    lines = result.stdout.splitlines()
    update = lines.index(f"would update: gateway -> {CODE_SEARCH}")
    diff = lines[update + 1 : update + 6]
    assert sorted(diff) == sorted(
        [
            '    subject: null -> {"groups": {"contains": "eng"}}',
            '    scopes: ["code.read", "code.search"] -> ["code.read"]',
            "    ttl: 120 -> 30",
            "    reuse_tokens: true -> false",
            '    copy_claims: ["email"] -> []',
        ]
    )
    assert "would create: wiki" in lines
    assert f"would delete: gateway -> {TICKETS}" in lines
    assert lines[-1] == "3 change(s), 3 unchanged"
    assert policy_ttls(started) == {
        CODE_SEARCH: 120,
        TICKETS: 60,
        "https://disabled.internal/mcp": 60,
    }


def test_policy_apply_dry_run_json_has_before_and_after(
    started: Path, tmp_path: Path, config: dict[str, Any]
) -> None:
    config["policies"][0].update(ttl=30, reuse_tokens=False)
    changed = write_config(tmp_path / "policies.yaml", {"policies": config["policies"]})

    result = cli(started, "policy", "apply", str(changed), "--dry-run", "--json")

    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    assert report["dry_run"] is True
    [update] = report["changes"]
    assert update["action"] == "update"
    assert (update["before"]["ttl"], update["after"]["ttl"]) == (120, 30)
    assert (update["before"]["reuse_tokens"], update["after"]["reuse_tokens"]) == (True, False)
    assert policy_ttls(started)[CODE_SEARCH] == 120


def test_policy_apply_dry_run_of_an_overlapping_file_exits_2(
    started: Path, tmp_path: Path, config: dict[str, Any]
) -> None:
    twin = {
        **config["policies"][0],
        "name": "twin",
        "audience": "HTTPS://CODE-SEARCH.INTERNAL:443/mcp",
    }
    bad = write_config(tmp_path / "policies.yaml", {"policies": [*config["policies"], twin]})

    result = cli(started, "policy", "apply", str(bad), "--dry-run")

    assert result.exit_code == 2
    assert result.stdout == ""
    assert f'policy "twin" ({bad}, line ' in result.stderr
    assert "could match the same requests" in result.stderr


def test_policy_apply_records_the_actor_and_history_shows_every_version(
    started: Path, shorter_ttl: Path
) -> None:
    name = f"gateway -> {CODE_SEARCH}"
    applied = cli(started, "policy", "apply", str(shorter_ttl), "--actor", "alice@example.com")
    assert applied.exit_code == 0, applied.output

    listed = cli(started, "policy", "history", name, "--json")
    table = cli(started, "policy", "history", name)

    assert listed.exit_code == 0, listed.output
    versions = json.loads(listed.stdout)
    assert [(v["version"], v["action"], v["changed_by"]) for v in versions] == [
        (1, "create", "bootstrap"),
        (2, "update", "alice@example.com"),
    ]
    assert [v["policy"]["ttl"] for v in versions] == [120, 30]
    assert all(v["changed_at"].endswith("Z") for v in versions)
    assert table.exit_code == 0, table.output
    rows = table.stdout.splitlines()
    assert rows[0].split() == ["version", "action", "changed_at", "changed_by", "policy"]
    assert rows[2].split()[:2] == ["2", "update"]
    assert "alice@example.com" in rows[2]
    assert "ttl=30" in rows[2]


def test_policy_history_of_an_unknown_policy_fails(started: Path) -> None:
    result = cli(started, "policy", "history", "nope")

    assert result.exit_code == 1
    assert result.stderr.strip() == "sidecar: error: no policy nope"


def test_policy_rollback_restores_a_version_as_a_new_one(started: Path, shorter_ttl: Path) -> None:
    name = f"gateway -> {CODE_SEARCH}"
    assert cli(started, "policy", "apply", str(shorter_ttl)).exit_code == 0
    assert policy_ttls(started)[CODE_SEARCH] == 30

    result = cli(started, "policy", "rollback", name, "--to", "1", "--actor", "carol")

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"policy {name} restored to version 1 as version 3"
    assert policy_ttls(started)[CODE_SEARCH] == 120
    versions = json.loads(cli(started, "policy", "history", name, "--json").stdout)
    assert versions[-1]["action"] == "rollback"
    assert versions[-1]["changed_by"] == "carol"
    assert versions[-1]["policy"] == versions[0]["policy"]


def test_policy_rollback_of_a_pruned_policy_recreates_it(
    started: Path, tmp_path: Path, config: dict[str, Any]
) -> None:
    name = f"gateway -> {TICKETS}"
    kept = [p for p in config["policies"] if p["audience"] != TICKETS]
    pruned = write_config(tmp_path / "policies.yaml", {"policies": kept})
    assert cli(started, "policy", "apply", str(pruned), "--prune").exit_code == 0
    assert TICKETS not in policy_ttls(started)

    result = cli(started, "policy", "rollback", name, "--to", "1")

    assert result.exit_code == 0, result.output
    assert policy_ttls(started)[TICKETS] == 60


def test_policy_rollback_to_a_missing_version_fails_and_changes_nothing(started: Path) -> None:
    name = f"gateway -> {CODE_SEARCH}"

    result = cli(started, "policy", "rollback", name, "--to", "7")

    assert result.exit_code == 1
    assert result.stderr.strip() == f"sidecar: error: policy {name} has no version 7"
    assert policy_ttls(started)[CODE_SEARCH] == 120


# --- keys ---------------------------------------------------------------------------------


def test_keys_list_shows_the_current_key(started: Path) -> None:
    table = run("keys", "list", config=started)
    listed = run("keys", "list", "--json", config=started)

    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert row["kid"] == next(iter(key_states(started)))
    assert row["state"] == "current"
    assert row["algorithm"] == "ES256"
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split()[:3] == ["kid", "algorithm", "state"]
    assert table.stdout.splitlines()[1].split()[:3] == [row["kid"], "ES256", "current"]


def test_keys_rotate_publishes_a_next_key(started: Path) -> None:
    [old_kid] = key_states(started)

    result = run("keys", "rotate", config=started)

    assert result.returncode == 0, result.stderr
    states = key_states(started)
    [new_kid] = set(states) - {old_kid}
    assert states == {old_kid: "current", new_kid: "next"}
    assert new_kid in result.stdout


def test_keys_rotate_now_warns_and_signs_with_the_new_key(started: Path) -> None:
    [old_kid] = key_states(started)

    result = run("keys", "rotate", "--now", "--json", config=started)

    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr
    new_kid = json.loads(result.stdout)["kid"]
    assert key_states(started) == {old_kid: "previous", new_kid: "current"}


def test_keys_retire_replaces_the_retired_key(started: Path) -> None:
    [old_kid] = key_states(started)

    result = run("keys", "retire", old_kid, config=started)

    assert result.returncode == 0, result.stderr
    states = key_states(started)
    assert states.pop(old_kid) == "previous"
    assert list(states.values()) == ["current"]


def test_keys_retire_of_an_unknown_kid_fails(started: Path) -> None:
    result = run("keys", "retire", "no-such-kid", config=started)

    assert "no-such-kid" in one_line_error(result)


def test_wrong_encryption_key_is_a_one_line_error(tmp_path: Path, config: dict[str, Any]) -> None:
    config["keys"]["encryption_key"] = ENCRYPTION_KEY
    right = write_config(tmp_path / "right.yaml", config)
    services = make_services(load_settings(right))
    services.engine.dispose()
    config["keys"]["encryption_key"] = "a different key-encryption key"
    wrong = write_config(tmp_path / "wrong.yaml", config)

    for command in (["keys", "list"], ["keys", "rotate"]):
        result = run(*command, config=wrong)

        assert "cannot be decrypted" in one_line_error(result), command
        assert ENCRYPTION_KEY not in result.stderr
    assert len(key_states(right)) == 1


def test_encrypted_keys_are_never_stored_in_clear(tmp_path: Path, config: dict[str, Any]) -> None:
    config["keys"]["encryption_key"] = ENCRYPTION_KEY
    config_file = write_config(tmp_path / "encrypted.yaml", config)
    engine = make_engine(config["database_url"])
    try:
        migrate.upgrade(engine)

        result = run("keys", "rotate", config=config_file)

        assert result.returncode == 0, result.stderr
        with engine.connect() as connection:
            [stored] = connection.scalars(text("SELECT private_key FROM signing_keys")).all()
    finally:
        engine.dispose()
    assert b"PRIVATE KEY" not in bytes(stored)


# --- the demo -----------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoCheckout:
    root: Path
    init_output: str
    token: str

    @property
    def config(self) -> Path:
        return self.root / "deploy" / "demo.yaml"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoCheckout:
    """A fresh clone's layout (deploy/ beside keys/) after `sidecar demo-init` and
    `sidecar demo-token`, run from its root as the README does."""
    root = tmp_path_factory.mktemp("checkout")
    (root / "deploy").mkdir()
    shutil.copy(REPO_ROOT / "deploy" / "demo.yaml", root / "deploy" / "demo.yaml")
    init = run("demo-init", config=root / "deploy" / "demo.yaml", cwd=root)
    assert init.returncode == 0, init.stderr
    token = run("demo-token", config=root / "deploy" / "demo.yaml", cwd=root)
    assert token.returncode == 0, token.stderr
    return DemoCheckout(root, init.stdout, token.stdout.strip())


def test_demo_init_creates_the_demo_idp_key_once(demo: DemoCheckout) -> None:
    private_key = demo.root / "keys" / "demo-idp.key.pem"
    key_before = private_key.read_bytes()

    again = run("demo-init", config=demo.config, cwd=demo.root)

    assert demo.init_output.startswith("created")
    assert again.stdout.startswith("kept")
    assert private_key.read_bytes() == key_before
    assert private_key.stat().st_mode & 0o077 == 0
    jwks = json.loads((demo.root / "keys" / "demo-idp.jwks.json").read_text())
    assert all("d" not in key for key in jwks["keys"])


def test_demo_token_is_a_jwt_from_the_demo_issuer(demo: DemoCheckout) -> None:
    trusted = load_settings(demo.config).trusted_issuers[0]
    jwks = jwt.PyJWKSet.from_json((demo.root / "keys" / "demo-idp.jwks.json").read_text())

    key = jwks[jwt.get_unverified_header(demo.token)["kid"]]
    claims = jwt.decode(
        demo.token, key, algorithms=["ES256"], audience=trusted.audiences[0], issuer=trusted.issuer
    )

    assert claims["iss"] == "https://idp.demo.local"
    assert claims["sub"] == "alice@example.com"
    assert claims["scope"] == "code.read code.search"


def test_demo_token_is_exchanged_under_the_demo_configuration(
    demo: DemoCheckout, tmp_path: Path
) -> None:
    settings = load_settings(demo.config).model_copy(
        update={"database_url": f"sqlite:///{tmp_path / 'demo.db'}"}
    )
    services = make_services(settings)
    server = LiveServer(create_app(settings, services))
    try:
        response = server.exchange(demo.token, auth=("gateway", "demo-gateway-secret-change-me"))
    finally:
        server.stop()
        services.engine.dispose()

    assert response.status_code == 200, response.text
    assert response.json()["issued_token_type"] == ACCESS_TOKEN_TYPE


def test_demo_token_without_demo_init_says_what_to_run(tmp_path: Path) -> None:
    (tmp_path / "deploy").mkdir()
    shutil.copy(REPO_ROOT / "deploy" / "demo.yaml", tmp_path / "deploy" / "demo.yaml")
    result = run("demo-token", config=tmp_path / "deploy" / "demo.yaml", cwd=tmp_path)

    assert "demo-init" in one_line_error(result)


def test_check_config_reports_a_missing_jwks_file(tmp_path: Path) -> None:
    (tmp_path / "deploy").mkdir()
    shutil.copy(REPO_ROOT / "deploy" / "demo.yaml", tmp_path / "deploy" / "demo.yaml")
    result = run("check-config", config=tmp_path / "deploy" / "demo.yaml", cwd=tmp_path)

    assert "trusted_issuers[0].jwks_file" in one_line_error(result)
    assert result.returncode == 2


# --- serve: the preparation runs in a child process ------------------------------------------

CHILD_STEP = """
import sys
from sidecar.cli import _in_child_process, fail

def step(settings):
    import xml.dom.minidom  # stands for what preparing imports and builds
    if settings == "fail":
        fail("the database is away")

_in_child_process(step, sys.argv[1])
print("parent goes on;", "xml.dom.minidom" in sys.modules)
"""


def test_serve_prepares_in_a_child_and_keeps_none_of_it() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD_STEP, "ok"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "parent goes on; False"


def test_a_failed_preparation_stops_serve_with_its_message_and_code() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD_STEP, "fail"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "sidecar: error: the database is away" in done.stderr
    assert "parent goes on" not in done.stdout
