"""`sidecar policy`: the exchange policies."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from sidecar.cli import fail, main, services_of, table
from sidecar.config import ConfigError, load_policies_file


@main.group()
def policy() -> None:
    """Exchange policies."""


@policy.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def policy_list(ctx: click.Context, as_json: bool) -> None:
    """List the policies in the database."""
    from sidecar.store.policies import policy_document

    documents = [policy_document(p) for p in services_of(ctx).policy_store.load()]
    documents.sort(key=lambda d: (d["client_id"], d["audience"]))
    if as_json:
        click.echo(json.dumps(documents, indent=2))
        return
    headers = ["client_id", "audience", "scopes", "default_scopes", "ttl", "enabled"]
    rows = [
        [d["client_id"], d["audience"], " ".join(d["scopes"]), " ".join(d["default_scopes"]),
         str(d["ttl"]), "yes" if d["enabled"] else "no"]
        for d in documents
    ]  # fmt: skip
    table(rows, headers)


@policy.command("apply")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print what would change; change nothing.")
@click.option("--prune", is_flag=True, help="Delete policies that are not in FILE.")
@click.option("--actor", default="cli", show_default=True, help="Who makes the change (history).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def policy_apply(
    ctx: click.Context, file: Path, dry_run: bool, prune: bool, actor: str, as_json: bool
) -> None:
    """Make the policy table match the `policies:` of FILE (a policy file or a config file).

    Exit status: 0 when the table matches (or was changed to match); with --dry-run, 3 when
    applying would change something.
    """
    services = services_of(ctx)
    try:
        policies = load_policies_file(file, services.settings)
    except ConfigError as exc:
        fail("invalid policies: " + "; ".join(str(exc).splitlines()), 2)
    changes = services.policy_store.apply(policies, actor=actor, dry_run=dry_run, prune=prune)
    lines = (
        [("create", p) for p in changes.created]
        + [("update", after) for _, after in changes.updated]
        + [("delete", p) for p in changes.deleted]
    )
    if as_json:
        changed = [
            {"action": a, "client_id": p.client_id, "audience": p.audience} for a, p in lines
        ]
        click.echo(
            json.dumps(
                {"dry_run": dry_run, "changes": changed, "unchanged": len(changes.unchanged)}
            )
        )
    else:
        prefix = "would " if dry_run else ""
        for action, p in lines:
            click.echo(f"{prefix}{action}: {p.client_id} -> {p.audience}")
        click.echo(f"{len(lines)} change(s), {len(changes.unchanged)} unchanged")
    if dry_run and changes.any:
        sys.exit(3)
