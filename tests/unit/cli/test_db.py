"""`sidecar db upgrade` and `sidecar db check` (sidecar/cli/__init__.py), in-process with click's
runner: the schema revision against the newest, connectivity, exit codes, and nothing of the
database URL's credentials in the output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from sidecar.cli import main
from sidecar.store import migrate


def run(config: dict[str, Any], tmp_path: Path, *args: str) -> Result:
    config_file = tmp_path / "sidecar.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return CliRunner().invoke(main, ["--config", str(config_file), *args])


def test_check_reports_a_current_sqlite_schema(config: dict[str, Any], tmp_path: Path) -> None:
    assert run(config, tmp_path, "db", "upgrade").exit_code == 0

    result = run(config, tmp_path, "db", "check", "--json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["reachable"] is True
    assert report["current"] is True
    assert report["revision"] == migrate.head_revision()
    assert report["backend"] == "sqlite"


def test_check_fails_on_a_schema_that_is_not_current(
    config: dict[str, Any], tmp_path: Path
) -> None:
    database = Path(config["database_url"].removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    database.touch()  # a database file with no schema at all

    result = run(config, tmp_path, "db", "check")

    assert result.exit_code == 1
    assert "NOT current: run `sidecar db upgrade`" in result.stdout


def test_check_never_creates_the_sqlite_file_it_checks(
    config: dict[str, Any], tmp_path: Path
) -> None:
    database = Path(config["database_url"].removeprefix("sqlite:///"))
    assert not database.exists()

    result = run(config, tmp_path, "db", "check", "--json")

    assert result.exit_code == 1
    assert json.loads(result.stdout)["reachable"] is False
    assert not database.exists()


def test_check_of_an_unreachable_postgresql_never_shows_the_password(
    config: dict[str, Any], tmp_path: Path
) -> None:
    password = "s3cret-" + "p" * 20
    config["database_url"] = f"postgresql+psycopg://sidecar:{password}@127.0.0.1:1/sidecar"
    config["database"] = {"connect_timeout": "1s"}

    result = run(config, tmp_path, "db", "check", "--json")

    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["reachable"] is False
    assert report["host"] == "127.0.0.1"
    assert password not in result.output


@pytest.mark.postgres
def test_check_reports_a_current_postgresql_schema(
    config: dict[str, Any], tmp_path: Path, postgres_url: str
) -> None:
    config["database_url"] = postgres_url
    config["database"] = {"pool_size": 2, "max_overflow": 0, "statement_timeout": "5s"}
    assert run(config, tmp_path, "db", "upgrade").exit_code == 0

    result = run(config, tmp_path, "db", "check")

    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("postgresql reachable in ")
    assert f"schema revision {migrate.head_revision()}" in result.stdout
