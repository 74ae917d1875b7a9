"""`sidecar policy`: the exchange policies - list, apply, history, rollback, explain."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from sidecar.cli import fail, main, services_of, settings_of, table, when
from sidecar.config import ConfigError, load_policies_file
from sidecar.exchange.policy import Policy
from sidecar.store.policies import PolicyChanges, PolicyError, policy_document

# Exit status of `apply --dry-run` when applying would change something, and of `explain` when
# the exchange would be refused: distinct from 1 (the command failed) so that CI can branch.
EXIT_DIFFERS = 3


@main.group()
def policy() -> None:
    """Exchange policies."""


def _conditions(document: dict[str, Any]) -> str:
    parts = [f"iss={document['issuer']}"] if "issuer" in document else []
    for claim, condition in document.get("subject", {}).items():
        ((operator, value),) = condition.items()
        parts.append(f"{claim} {operator} {json.dumps(value)}")
    return "; ".join(parts) or "-"


@policy.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def policy_list(ctx: click.Context, as_json: bool) -> None:
    """List the policies in the database."""
    stored = services_of(ctx).policy_store.all()
    documents = [{**policy_document(s.policy), "version": s.version} for s in stored]
    if as_json:
        click.echo(json.dumps(documents, indent=2))
        return
    headers = [
        "name", "client_id", "audience", "subject", "scopes", "default", "ttl", "enabled",
        "credential",
    ]  # fmt: skip
    rows = [
        [d["name"], d["client_id"], d["audience"], _conditions(d), " ".join(d["scopes"]),
         " ".join(d["default_scopes"]), str(d["ttl"]), "yes" if d["enabled"] else "no",
         f"{d['credential']} ({d['upstream']})" if "upstream" in d else "mint"]
        for d in documents
    ]  # fmt: skip
    table(rows, headers)


def _field_diff(before: Policy, after: Policy) -> list[str]:
    old, new = policy_document(before), policy_document(after)
    return [
        f"    {key}: {json.dumps(old.get(key))} -> {json.dumps(new.get(key))}"
        for key in dict.fromkeys([*old, *new])
        if old.get(key) != new.get(key)
    ]


def _print_changes(changes: PolicyChanges, dry_run: bool) -> None:
    prefix = "would " if dry_run else ""
    for p in changes.created:
        click.echo(f"{prefix}create: {p.name}")
    for before, after in changes.updated:
        click.echo(f"{prefix}update: {after.name}")
        for line in _field_diff(before, after):
            click.echo(line)
    for p in changes.deleted:
        click.echo(f"{prefix}delete: {p.name}")
    count = len(changes.created) + len(changes.updated) + len(changes.deleted)
    click.echo(f"{count} change(s), {len(changes.unchanged)} unchanged")


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
    """Make the policy table match the `policies:` of FILE (a policy file or a config file),
    in one transaction.

    Exit status: 0 when the table matches (or was changed to match); with --dry-run, 3 when
    applying would change something; 2 when FILE is invalid (nothing is changed).
    """
    services = services_of(ctx)
    try:
        policies = load_policies_file(file, services.settings)
        changes = services.policy_store.apply(policies, actor=actor, dry_run=dry_run, prune=prune)
    except (ConfigError, PolicyError) as exc:
        fail("invalid policies: " + "; ".join(str(exc).splitlines()), 2)
    if as_json:

        def entry(action: str, p: Policy, **extra: Any) -> dict[str, Any]:
            return {"action": action, "name": p.name, "client_id": p.client_id,
                    "audience": p.audience, **extra}  # fmt: skip

        changed = (
            [entry("create", p) for p in changes.created]
            + [
                entry("update", a, before=policy_document(b), after=policy_document(a))
                for b, a in changes.updated
            ]
            + [entry("delete", p) for p in changes.deleted]
        )
        click.echo(
            json.dumps(
                {"dry_run": dry_run, "changes": changed, "unchanged": len(changes.unchanged)}
            )
        )
    else:
        _print_changes(changes, dry_run)
    if dry_run and changes.any:
        sys.exit(EXIT_DIFFERS)


@policy.command("history")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def policy_history(ctx: click.Context, name: str, as_json: bool) -> None:
    """Every version of policy NAME: who changed it, when, and to what."""
    versions = services_of(ctx).policy_store.history(name)
    if not versions:
        fail(f"no history for policy {name}")
    if as_json:
        click.echo(json.dumps([
            {"version": v.version, "action": v.action, "changed_at": when(v.changed_at),
             "changed_by": v.changed_by, "policy": v.document}
            for v in versions
        ], indent=2))  # fmt: skip
        return
    rows = [
        [str(v.version), v.action, when(v.changed_at), v.changed_by,
         f"scopes={' '.join(v.document['scopes'])} ttl={v.document['ttl']} "
         f"enabled={'yes' if v.document['enabled'] else 'no'} subject={_conditions(v.document)}"]
        for v in versions
    ]  # fmt: skip
    table(rows, ["version", "action", "changed_at", "changed_by", "policy"])


@policy.command("rollback")
@click.argument("name")
@click.option("--to", "version", type=int, required=True, help="The version to restore.")
@click.option("--actor", default="cli", show_default=True, help="Who makes the change (history).")
@click.pass_context
def policy_rollback(ctx: click.Context, name: str, version: int, actor: str) -> None:
    """Restore policy NAME as it was at a version (recorded as a new version)."""
    try:
        stored = services_of(ctx).policy_store.rollback(name, version, actor=actor)
    except PolicyError as exc:
        fail(str(exc))
    click.echo(f"policy {name} restored to version {version} as version {stored.version}")


@policy.command("explain")
@click.option("--client", "client_id", required=True, help="The gateway's client_id.")
@click.option("--audience", "audiences", multiple=True, help="A requested audience (repeatable).")
@click.option("--resource", "resources", multiple=True, help="A requested resource (repeatable).")
@click.option("--scope", help="The requested scope (space-separated); omit for the defaults.")
@click.option("--claims", help="The subject token's claims as JSON (taken as verified).")
@click.option(
    "--subject-token",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A file holding a subject token, verified as /token would.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def policy_explain(
    ctx: click.Context,
    client_id: str,
    audiences: tuple[str, ...],
    resources: tuple[str, ...],
    scope: str | None,
    claims: str | None,
    subject_token: Path | None,
    as_json: bool,
) -> None:
    """Print the decision the running service would make for an exchange, and why, without
    minting anything. Exit status 0 when it would be granted, 3 when refused."""
    from sidecar.cli.explain import explain

    if (claims is None) == (subject_token is None):
        fail("give exactly one of --claims JSON or --subject-token FILE", 2)
    try:
        subject: dict[str, Any] | str = (
            json.loads(claims) if claims is not None else subject_token.read_text().strip()  # type: ignore[union-attr]
        )
    except ValueError:
        fail("--claims is not valid JSON", 2)
    if claims is not None and not isinstance(subject, dict):
        # A JSON string would otherwise be taken for a subject token, a list fail deep inside.
        fail("--claims must be a JSON object", 2)
    settings_of(ctx)
    result = explain(
        services_of(ctx),
        client_id=client_id,
        audiences=audiences,
        resources=resources,
        scope=scope,
        subject=subject,
        now=int(time.time()),
    )
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            shown = " ".join(value) if isinstance(value, list) else value
            click.echo(f"{key}: {shown}")
    if result["decision"] != "granted":
        sys.exit(EXIT_DIFFERS)
