"""Hot reload of the exchange policies (issue 5): a policy changed through the command line, in
another process, against the database of a running service, holds within
``policy_refresh_interval`` with no restart; between two refreshes no request reads the policy
table. Served over real HTTP: in process, and by ``sidecar serve`` with two gunicorn workers."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from sqlalchemy import event
from sqlalchemy.orm import sessionmaker

from sidecar.services import Services
from sidecar.store.models import AuditEventRow
from tests.conftest import (
    ACCESS_TOKEN_TYPE,
    CODE_SEARCH,
    GATEWAY_SECRET,
    TOKEN_EXCHANGE,
    ClientKeys,
    LiveServer,
    TestIdP,
    base_config,
)
from tests.launcher import SIDECAR, Served, start_serve

REFRESH_INTERVAL = 1.0  # seconds: policy_refresh_interval of the services under test
# A change must hold within the interval; the margin absorbs one load, the CLI process exiting
# and a loaded machine. Polling stops as soon as the change holds.
DEADLINE = REFRESH_INTERVAL + 4.0
WIKI = "https://wiki.internal/mcp"


def run_cli(config_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "SIDECAR_CONFIG"}
    return subprocess.run(
        [*SIDECAR, "--config", str(config_file), *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )


def changed_policies(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The configured policies with code-search narrowed to code.read and a new wiki policy."""
    policies = [dict(p) for p in config["policies"]]
    code_search = next(
        p for p in policies if (p["client_id"], p["audience"]) == ("gateway", CODE_SEARCH)
    )
    code_search.update(scopes=["code.read"], default_scopes=["code.read"])
    policies.append(
        {"client_id": "gateway", "audience": WIKI, "scopes": ["wiki.read"],
         "default_scopes": ["wiki.read"], "ttl": 60}
    )  # fmt: skip
    return policies


def apply_through_the_cli(config_file: Path, config: dict[str, Any], directory: Path) -> None:
    policy_file = directory / "changed-policies.yaml"
    policy_file.write_text(yaml.safe_dump({"policies": changed_policies(config)}))
    result = run_cli(config_file, "policy", "apply", str(policy_file), "--actor", "hot-reload")
    assert result.returncode == 0, result.stderr
    assert "update: gateway -> https://code-search.internal/mcp" in result.stdout
    assert f"create: gateway -> {WIKI}" in result.stdout


def poll_until(check: Callable[[], bool], deadline: float) -> float:
    """Seconds until ``check`` held; fails if it did not within ``deadline`` seconds."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > deadline:
            pytest.fail(f"the new policies did not hold within {deadline}s")
        time.sleep(0.05)
    return time.monotonic() - started


def outcome(response: requests.Response) -> str:
    return "granted" if response.status_code == 200 else str(response.json().get("error"))


# --- in process ---------------------------------------------------------------------------------


@pytest.fixture
def config(config: dict[str, Any]) -> dict[str, Any]:
    config["policy_refresh_interval"] = f"{int(REFRESH_INTERVAL)}s"
    return config


def test_a_policy_applied_through_the_cli_holds_within_the_refresh_interval(
    server: LiveServer,
    services: Services,
    idp: TestIdP,
    config: dict[str, Any],
    config_file: Path,
    tmp_path: Path,
) -> None:
    def search() -> str:
        return outcome(server.exchange(idp.token(), scope="code.search"))

    def wiki() -> str:
        return outcome(server.exchange(idp.token(), audience=WIKI))

    assert search() == "granted"
    assert wiki() == "invalid_target"

    apply_through_the_cli(config_file, config, tmp_path)
    elapsed = poll_until(lambda: search() == "invalid_scope" and wiki() == "granted", DEADLINE)

    assert elapsed <= DEADLINE
    # It holds from then on (no worker falls back to the old set), with the same server.
    assert [search() for _ in range(5)] == ["invalid_scope"] * 5
    assert outcome(server.exchange(idp.token())) == "granted"  # code.read is still allowed
    assert services.audit.flush()
    with sessionmaker(services.engine)() as session:
        denial = (
            session.query(AuditEventRow)
            .filter(AuditEventRow.error == "invalid_scope")
            .order_by(AuditEventRow.id.desc())
            .first()
        )
    assert denial is not None
    assert denial.reason == "scope not allowed by the policy: code.search"


@pytest.fixture
def policy_queries(services: Services) -> Iterator[list[str]]:
    """Every SQL statement that reads the policy table, from now on."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM policies" in statement:
            seen.append(statement)

    event.listen(services.engine, "before_cursor_execute", record)
    yield seen
    event.remove(services.engine, "before_cursor_execute", record)


def test_requests_between_refreshes_do_not_read_the_policy_table(
    config: dict[str, Any], request: pytest.FixtureRequest
) -> None:
    # Set before the service is built, so that no refresh falls within the test.
    config["policy_refresh_interval"] = "60s"
    server: LiveServer = request.getfixturevalue("server")
    idp: TestIdP = request.getfixturevalue("idp")
    queries: list[str] = request.getfixturevalue("policy_queries")

    outcomes = [outcome(server.exchange(idp.token()))]
    first_load = len(queries)  # the table's change marker and its rows, once
    outcomes += [outcome(server.exchange(idp.token())) for _ in range(9)]
    outcomes += [outcome(server.exchange(idp.token(), audience=WIKI)) for _ in range(5)]

    assert outcomes == ["granted"] * 10 + ["invalid_target"] * 5
    assert first_load <= 2
    assert len(queries) == first_load  # none per request


# --- sidecar serve, two workers -----------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Served, dict[str, Any], Path]]:
    idp = TestIdP(tmp_path)
    config = base_config(idp, ClientKeys(), f"sqlite:///{tmp_path / 'sidecar.db'}")
    config["policy_refresh_interval"] = f"{int(REFRESH_INTERVAL)}s"
    server = start_serve(tmp_path, config)
    server.extra["idp"] = idp
    try:
        yield server, config, server.config_file
    finally:
        server.kill()


def test_every_served_worker_sees_a_cli_change_without_a_restart(
    served: tuple[Served, dict[str, Any], Path], tmp_path: Path
) -> None:
    server, config, config_file = served
    pid = server.process.pid

    def search() -> str:
        # No session: each request is a new connection, which the kernel hands to either worker.
        response = requests.post(
            f"{server.url}/token",
            data={
                "grant_type": TOKEN_EXCHANGE,
                "subject_token": server.extra["idp"].token(),
                "subject_token_type": ACCESS_TOKEN_TYPE,
                "audience": CODE_SEARCH,
                "scope": "code.search",
            },
            auth=("gateway", GATEWAY_SECRET),
            timeout=10,
        )
        return outcome(response)

    assert [search() for _ in range(10)] == ["granted"] * 10

    apply_through_the_cli(config_file, config, tmp_path)
    # Ten refusals in a row: every worker has the new policy set.
    streak = 0

    def ten_in_a_row() -> bool:
        nonlocal streak
        streak = streak + 1 if search() == "invalid_scope" else 0
        return streak >= 10

    poll_until(ten_in_a_row, DEADLINE + 2.0)
    assert [search() for _ in range(10)] == ["invalid_scope"] * 10
    assert server.process.poll() is None
    assert server.process.pid == pid  # the same server, never restarted
    assert server.log().count("Spawning worker") == 2  # no worker was replaced
