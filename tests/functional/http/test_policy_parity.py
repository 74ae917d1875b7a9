"""The policy commands (sidecar/cli/policy.py) and the policy admin API (sidecar/web/admin.py)
side by side: the same operations through either leave the same history (versions, actions,
documents), differing only in who is recorded: the operating-system user or ``--actor`` for the
command line, ``admin:NAME`` for the API. And a change made outside a policy file (a rollback,
an admin API disable) is named by ``policy apply --dry-run`` and ``policy diff`` of that file.

Each test runs on the service in-process (SQLite and PostgreSQL) and under ``sidecar serve`` (its
SQLite file), the commands in-process on the same database. The module's served tests share one
server; the policy tables are put back as it bootstrapped them before each test."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from sidecar.cli import when
from tests.conftest import (
    CODE_SEARCH,
    ClientKeys,
    Gateway,
    ServedGateway,
    TestIdP,
    base_config,
    write_config,
)
from tests.functional.http.admin_support import (
    AdminClient,
    PolicyTables,
    admin_credentials,
    enable_admin,
    policy_path,
    policy_tables,
    restore_policy_tables,
)
from tests.unit.support import cli

NAME = "billing"
FIRST: dict[str, Any] = {
    "name": NAME,
    "client_id": "gateway",
    "audience": "https://billing.internal/api",
    "subject": {"groups": {"contains": "finance"}},
    "scopes": ["billing.read", "billing.write"],
    "default_scopes": ["billing.read"],
    "ttl": 60,
}
SECOND: dict[str, Any] = {**FIRST, "scopes": ["billing.read"], "ttl": 30}
OS_USER = "dana"
# The history of the sequence below, whichever way it is run: (version, action).
SEQUENCE = [
    (1, "create"),
    (2, "update"),
    (3, "disable"),
    (4, "enable"),
    (5, "rollback"),  # to version 1
    (6, "delete"),
    (7, "rollback"),  # to version 5: brings the deleted policy back
]

SERVE_ON_SQLITE = "sidecar serve runs on its own SQLite file in these tests"


@pytest.fixture(scope="module")
def gateway_credentials() -> dict[str, str]:
    return admin_credentials()


@pytest.fixture(scope="module")
def gateway_config(
    gateway_config: dict[str, Any], gateway_credentials: dict[str, str]
) -> dict[str, Any]:
    return enable_admin(gateway_config, gateway_credentials)


@pytest.fixture(scope="module")
def bootstrap_policies(served_gateway: ServedGateway) -> PolicyTables:
    return policy_tables(served_gateway.engine)


@pytest.fixture
def credentials(request: pytest.FixtureRequest) -> dict[str, str]:
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("gateway_target") == "serve":
        return dict(request.getfixturevalue("gateway_credentials"))
    return admin_credentials()


@pytest.fixture
def config(
    idp: TestIdP, client_keys: ClientKeys, database_url: str, credentials: dict[str, str]
) -> dict[str, Any]:
    return enable_admin(base_config(idp, client_keys, database_url), credentials)


@pytest.fixture
def gateway(request: pytest.FixtureRequest, database_url: str, gateway: Gateway) -> Gateway:
    """The service under test, its policy tables as it bootstrapped them."""
    if isinstance(gateway, ServedGateway):
        if not database_url.startswith("sqlite"):
            pytest.skip(SERVE_ON_SQLITE)
        restore_policy_tables(gateway.engine, request.getfixturevalue("bootstrap_policies"))
    return gateway


@pytest.fixture
def admin(gateway: Gateway, credentials: dict[str, str]) -> AdminClient:
    return AdminClient(gateway.url, credentials["ops"], session=gateway.session)


@pytest.fixture
def sidecar(
    gateway: Gateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Any]:
    """``sidecar ARGS...`` in-process, configured with the service's own file (so on its
    database), run by the operating-system user OS_USER."""
    monkeypatch.setenv("LOGNAME", OS_USER)  # getpass.getuser() reads it first
    config_file = write_config(tmp_path / "sidecar-cli.yaml", gateway.config)

    def run(*args: str, expect: int = 0) -> Any:
        result = cli(config_file, *args)
        assert result.exit_code == expect, result.output
        return result

    return run


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    """Policy files holding FIRST, and SECOND."""
    return (
        write_config(tmp_path / "first.yaml", {"policies": [FIRST]}),
        write_config(tmp_path / "second.yaml", {"policies": [SECOND]}),
    )


def etag(version: int) -> str:
    return f'"{version}"'


def run_through_the_command_line(sidecar: Callable[..., Any], files: tuple[Path, Path]) -> None:
    first, second = files
    sidecar("policy", "apply", str(first), "--actor", "ci-bot")
    sidecar("policy", "apply", str(second))
    sidecar("policy", "disable", NAME)
    sidecar("policy", "enable", NAME)
    sidecar("policy", "rollback", NAME, "--to", "1")
    sidecar("policy", "delete", NAME, "--yes")
    sidecar("policy", "rollback", NAME, "--to", "5", "--actor", "carol")


def run_through_the_admin_api(admin: AdminClient) -> None:
    answers = [
        admin.create(FIRST),
        admin.put(NAME, SECOND, etag(1)),
        admin.request("POST", policy_path(NAME, "/disable"), if_match=etag(2)),
        admin.request("POST", policy_path(NAME, "/enable"), if_match=etag(3)),
        admin.request(
            "POST", policy_path(NAME, "/rollback"), if_match=etag(4), json={"version": 1}
        ),
        admin.request("DELETE", policy_path(NAME), if_match=etag(5)),
        # A deleted policy's version is its deletion's (its history says so).
        admin.request(
            "POST", policy_path(NAME, "/rollback"), if_match=etag(6), json={"version": 5}
        ),
    ]
    assert [a.status_code for a in answers] == [201, 200, 200, 200, 200, 204, 200], [
        a.text for a in answers
    ]
    versions = [int(a.headers["ETag"].strip('"')) for a in answers if a.status_code != 204]
    assert versions == [1, 2, 3, 4, 5, 7]


def cli_history(sidecar: Callable[..., Any]) -> list[dict[str, Any]]:
    versions: list[dict[str, Any]] = json.loads(sidecar("policy", "history", NAME, "--json").stdout)
    return versions


def api_history(admin: AdminClient) -> list[dict[str, Any]]:
    response = admin.history(NAME)
    assert response.status_code == 200, response.text
    versions: list[dict[str, Any]] = response.json()["versions"]
    return versions


def the_same_in_both(versions: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What either way must leave alike: each version's number, action and document."""
    return [(v["version"], v["action"], v["policy"]) for v in versions]


def test_each_operation_leaves_the_same_history_through_the_cli_and_the_admin_api(
    gateway: Gateway, admin: AdminClient, sidecar: Callable[..., Any], files: tuple[Path, Path]
) -> None:
    untouched = policy_tables(gateway.engine)
    run_through_the_command_line(sidecar, files)
    by_cli = cli_history(sidecar)
    by_cli_as_the_api_reads_it = api_history(admin)
    cli_diff = json.loads(
        sidecar("policy", "history", NAME, "--from", "1", "--to", "2", "--json").stdout
    )
    cli_show = json.loads(sidecar("policy", "show", NAME, "--json").stdout)
    cli_export = sidecar("policy", "export").stdout
    restore_policy_tables(gateway.engine, untouched)

    run_through_the_admin_api(admin)
    by_api = api_history(admin)
    api_diff = admin.request("GET", policy_path(NAME, "/history") + "?from=1&to=2")
    api_show = admin.get(NAME)
    api_export = admin.request("GET", "/admin/export")

    assert [(v, a) for v, a, _ in the_same_in_both(by_cli)] == SEQUENCE
    assert the_same_in_both(by_api) == the_same_in_both(by_cli)
    assert the_same_in_both(by_cli_as_the_api_reads_it) == the_same_in_both(by_cli)
    assert [v["changed_by"] for v in by_cli] == ["ci-bot", *[OS_USER] * 5, "carol"]
    assert {v["changed_by"] for v in by_api} == {"admin:ops"}
    # The documents follow the sequence: version 5 is version 1's, 7 is 5's.
    documents = [v["policy"] for v in by_api]
    assert [d["ttl"] for d in documents] == [60, 30, 30, 30, 60, 60, 60]
    assert [d["enabled"] for d in documents] == [True, True, False, True, True, True, True]
    # The other operations, read both ways, agree too.
    assert api_diff.status_code == 200
    assert api_diff.json() == cli_diff
    assert [c["field"] for c in cli_diff["changes"]] == ["scopes", "ttl"]
    assert api_show.json() == {
        k: v for k, v in cli_show.items() if k not in ("updated_at", "updated_by")
    }
    assert api_show.headers["ETag"] == etag(cli_show["version"]) == etag(7)
    assert api_export.status_code == 200
    assert api_export.headers["Content-Type"].startswith("application/yaml")
    assert api_export.text == cli_export


def test_an_export_through_either_is_applied_as_it_is(
    admin: AdminClient, sidecar: Callable[..., Any], tmp_path: Path
) -> None:
    assert admin.create(FIRST).status_code == 201
    exported = tmp_path / "exported.yaml"
    exported.write_text(admin.request("GET", "/admin/export").text)
    names = {p["name"] for p in yaml.safe_load(exported.read_text())["policies"]}
    assert NAME in names
    assert all("version" not in p for p in yaml.safe_load(exported.read_text())["policies"])

    applied = sidecar("policy", "apply", str(exported), "--prune", "--json")
    compared = sidecar("policy", "diff", str(exported))

    assert json.loads(applied.stdout)["changes"] == []
    assert compared.stdout.splitlines()[-1] == (
        f"0 change(s), {len(names)} unchanged, 0 only in the database"
    )


# --- drift ------------------------------------------------------------------------------------


def test_an_admin_api_disable_is_named_by_apply_dry_run_and_diff_of_the_file(
    admin: AdminClient, sidecar: Callable[..., Any], files: tuple[Path, Path]
) -> None:
    first, second = files
    sidecar("policy", "apply", str(first))
    sidecar("policy", "apply", str(second))
    disabled = admin.request("POST", policy_path(NAME, "/disable"), if_match=etag(2))
    assert disabled.status_code == 200, disabled.text
    changed_at = admin.history(NAME).json()["versions"][-1]["changed_at"]

    dry_run = sidecar("policy", "apply", str(second), "--dry-run", expect=3)
    diff = sidecar("policy", "diff", str(second), "--json", expect=3)

    [warning] = dry_run.stderr.splitlines()
    assert warning == (
        f"warning: policy {NAME}: version 3 was a disable by admin:ops at {when(changed_at)}; "
        f"applying {second} undoes it"
    )
    assert dry_run.stdout.splitlines()[:2] == [
        f"would update: {NAME}",
        "    enabled: false -> true",
    ]
    assert json.loads(diff.stdout)["warnings"] == [warning]
    assert diff.stderr.splitlines() == [warning]


def test_apply_of_the_file_after_an_admin_api_change_still_applies_it(
    admin: AdminClient, sidecar: Callable[..., Any], files: tuple[Path, Path]
) -> None:
    first, _ = files
    sidecar("policy", "apply", str(first))
    read = admin.get(NAME)
    assert admin.put(NAME, {**read.json(), "ttl": 45}, read.headers["ETag"]).status_code == 200

    applied = sidecar("policy", "apply", str(first))

    assert "version 2 was an update by admin:ops" in applied.stderr
    assert admin.get(NAME).json()["ttl"] == 60
    assert [v["changed_by"] for v in api_history(admin)] == [OS_USER, "admin:ops", OS_USER]


def test_refused_writes_carry_their_reason_phrase_in_the_status_line(
    gateway: Gateway, credentials: dict[str, str]
) -> None:
    # requests keeps the reason phrase of the status line as the server wrote it.
    headers = {"Authorization": f"Bearer {credentials['ops']}"}
    url = gateway.url + policy_path(f"gateway -> {CODE_SEARCH}")
    document = {"client_id": "gateway", "audience": CODE_SEARCH, "scopes": ["code.read"]}

    without = requests.put(url, json=document, headers=headers, timeout=10)
    stale = requests.put(url, json=document, headers={**headers, "If-Match": '"9"'}, timeout=10)
    unknown = requests.get(gateway.url + policy_path("nope"), headers=headers, timeout=10)

    assert (without.status_code, without.reason) == (428, "Precondition Required")
    assert (stale.status_code, stale.reason) == (412, "Precondition Failed")
    assert (unknown.status_code, unknown.reason) == (404, "Not Found")
