"""`sidecar upstreams list|import`: what is configured, never a secret; backend definitions
turned into an ``upstreams:`` section with their references kept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.support import cli, invoke, one_line_error

VENDOR = "https://api.vendor.example/mcp"
KEY = "vendor-key-" + "k" * 24
UPSTREAM_SECRET = "upstream-secret-" + "s" * 16


def with_upstreams(config: dict[str, Any], tmp_path: Path) -> Path:
    config["upstreams"] = [
        {"name": "vendor", "url": VENDOR, "credentials": {"type": "bearer", "token": KEY}},
        {
            "name": "tickets",
            "credentials": {
                "type": "client_credentials",
                "token_url": "https://auth.tickets.example/oauth/token",
                "client_id": "sidecar",
                "client_secret": UPSTREAM_SECRET,
            },
        },
    ]
    config["policies"].append(
        {
            "client_id": "gateway",
            "audience": VENDOR,
            "scopes": ["vendor.read"],
            "credential": "static",
            "upstream": "vendor",
        }
    )
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_list_shows_each_upstream_its_type_and_policies_but_no_secret(
    config: dict[str, Any], tmp_path: Path
) -> None:
    result = cli(with_upstreams(config, tmp_path), "upstreams", "list", "--json")

    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert [(u["name"], u["type"], u["mode"]) for u in listed] == [
        ("vendor", "bearer", "static"),
        ("tickets", "client_credentials", "client_credentials"),
    ]
    assert listed[0]["policies"] == [f"gateway -> {VENDOR}"]
    assert listed[1]["token_url"] == "https://auth.tickets.example/oauth/token"
    table = cli(with_upstreams(config, tmp_path), "upstreams", "list").stdout
    for output in (result.stdout, table):
        assert KEY not in output
        assert UPSTREAM_SECRET not in output


def test_import_prints_an_upstreams_section_keeping_references(tmp_path: Path) -> None:
    definitions = [
        {
            "name": "vendor",
            "url": VENDOR,
            "credentials": {"type": "bearer", "token": "${VENDOR_API_KEY}"},
        }
    ]
    file = tmp_path / "backends.json"
    file.write_text(json.dumps({"backends": definitions}))

    result = invoke("upstreams", "import", str(file))

    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout) == {"upstreams": definitions}


@pytest.mark.parametrize("token", [KEY, "${VENDOR}" + KEY, KEY + "${VENDOR}"])
def test_import_refuses_a_literal_secret_without_printing_it(tmp_path: Path, token: str) -> None:
    file = tmp_path / "backends.json"
    file.write_text(json.dumps([{"name": "v", "credentials": {"type": "bearer", "token": token}}]))

    line = one_line_error(invoke("upstreams", "import", str(file)))

    assert "credentials.token is a literal" in line
    assert KEY not in line


def test_import_refuses_an_invalid_definition_naming_where(tmp_path: Path) -> None:
    file = tmp_path / "backends.yaml"
    file.write_text(
        yaml.safe_dump([{"name": "v", "credentials": {"type": "header", "header": "Host",
                                                       "token": "${K}"}}])
    )  # fmt: skip

    line = one_line_error(invoke("upstreams", "import", str(file)))

    assert "[0].credentials" in line
    assert "cannot carry a credential" in line
