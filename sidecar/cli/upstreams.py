"""`sidecar upstreams`: the credentials configured for upstreams that do not trust our JWKS -
list them (never a secret), and import gateway backend definitions as an ``upstreams:`` section."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click
import yaml
from pydantic import TypeAdapter, ValidationError

from sidecar.cli import fail, main, settings_of, table

SECRET_FIELDS = ("token", "client_secret")
REFERENCE = re.compile(r"\$\{[^${}]+\}")  # the whole value: one ${NAME} or ${file:PATH}


@main.group()
def upstreams() -> None:
    """Upstream credentials (policies with credential static or client_credentials)."""


@upstreams.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def upstreams_list(ctx: click.Context, as_json: bool) -> None:
    """The configured upstreams, their credential type and the policies of the config file
    that use them; secrets are never shown."""
    settings = settings_of(ctx)
    rows: list[dict[str, Any]] = []
    for upstream in settings.upstreams:
        credentials = upstream.credentials
        policies = [
            p.name or f"{p.client_id} -> {p.audience}"
            for p in settings.policies
            if p.upstream == upstream.name
        ]
        rows.append(
            {
                "name": upstream.name,
                "url": upstream.url,
                "type": credentials.type,
                "mode": upstream.mode,
                "header": getattr(credentials, "header", None),
                "token_url": getattr(credentials, "token_url", None),
                "policies": policies,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table(
        [
            [str(r["name"]), str(r["type"]), str(r["url"] or "-"),
             str(r["token_url"] or r["header"] or "-"), " ".join(r["policies"]) or "-"]
            for r in rows
        ],
        ["name", "type", "url", "token_url/header", "policies (config file)"],
    )  # fmt: skip


@upstreams.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def upstreams_import(file: Path) -> None:
    """Read gateway backend definitions (JSON or YAML: a list, or {backends: [...]}), check
    them, and print them as an ``upstreams:`` section to paste into the configuration.
    ``${NAME}`` references are kept as they are: no secret is read or printed."""
    from sidecar.config import ConfigError
    from sidecar.config.loading import read_upstreams_file
    from sidecar.config.upstreams import UpstreamConfig

    try:
        definitions = read_upstreams_file(str(file), None)
    except ConfigError as exc:
        fail(str(exc), 2)
    checked: list[dict[str, Any]] = []
    for index, definition in enumerate(definitions):
        try:
            # Validated with placeholders for the references (their values stay unread).
            TypeAdapter(UpstreamConfig).validate_python(_placeholders(definition))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            fail(f"{file}: [{index}].{where}: {first['msg']}", 2)
        credentials = definition.get("credentials") or {}
        for name in SECRET_FIELDS:
            value = credentials.get(name)
            if isinstance(value, str) and not REFERENCE.fullmatch(value):
                # Printing it would copy a secret into a terminal and a config file.
                fail(f"{file}: [{index}].credentials.{name} is a literal: use ${{NAME}} or "
                     "${file:PATH}", 2)  # fmt: skip
        checked.append(definition)
    click.echo(yaml.safe_dump({"upstreams": checked}, sort_keys=False).rstrip())


def _placeholders(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _placeholders(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_placeholders(v) for v in value]
    if isinstance(value, str) and "${" in value:
        return "placeholder-secret"
    return value
