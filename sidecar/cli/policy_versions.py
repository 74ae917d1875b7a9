"""`sidecar policy` commands on one policy's versions: enable, disable, delete (each recorded as
a new version), history, rollback."""

from __future__ import annotations

import json
import shlex

import click

from sidecar.cli import fail, services_of, table, when
from sidecar.cli.actors import actor_option
from sidecar.cli.policy import conditions, policy
from sidecar.store.policy_documents import PolicyError


def _set_enabled(ctx: click.Context, name: str, enabled: bool, actor: str) -> None:
    store = services_of(ctx).policy_store
    before = store.get(name)
    try:
        stored = store.set_enabled(name, enabled, actor=actor)
    except PolicyError as exc:
        fail("; ".join(str(exc).splitlines()))
    state = "enabled" if enabled else "disabled"
    if before is not None and before.version == stored.version:
        click.echo(f"policy {name} is already {state} (version {stored.version})")
    else:
        click.echo(f"policy {name} {state} as version {stored.version}")


@policy.command("enable")
@click.argument("name")
@actor_option()
@click.pass_context
def policy_enable(ctx: click.Context, name: str, actor: str) -> None:
    """Enable policy NAME (a new version; none if it is enabled already)."""
    _set_enabled(ctx, name, True, actor)


@policy.command("disable")
@click.argument("name")
@actor_option()
@click.pass_context
def policy_disable(ctx: click.Context, name: str, actor: str) -> None:
    """Disable policy NAME: kept, but refused at /token (a new version; none if it is disabled
    already)."""
    _set_enabled(ctx, name, False, actor)


@policy.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Delete without asking (required).")
@actor_option()
@click.pass_context
def policy_delete(ctx: click.Context, name: str, yes: bool, actor: str) -> None:
    """Delete policy NAME: /token refuses its audience at once. Its history stays: `policy
    rollback NAME --to VERSION` brings it back."""
    if not yes:
        fail(f"deleting policy {name} needs --yes", 2)
    try:
        version = services_of(ctx).policy_store.delete(name, actor=actor)
    except PolicyError as exc:
        fail(str(exc))
    restore = f"sidecar policy rollback {shlex.quote(name)} --to {version - 1}"
    click.echo(f"policy {name} deleted as version {version} (`{restore}` restores it)")


@policy.command("history")
@click.argument("name")
@click.option("--from", "from_version", type=click.IntRange(min=1), metavar="A",
              help="With --to: the fields that differ from version A...")  # fmt: skip
@click.option("--to", "to_version", type=click.IntRange(min=1), metavar="B",
              help="...to version B.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def policy_history(
    ctx: click.Context, name: str, from_version: int | None, to_version: int | None, as_json: bool
) -> None:
    """Every version of policy NAME: who changed it, when, and to what; with --from A --to B,
    the fields that differ between versions A and B."""
    if (from_version is None) != (to_version is None):
        fail("give both --from and --to, or neither", 2)
    store = services_of(ctx).policy_store
    if from_version is not None and to_version is not None:
        try:
            changes = store.diff(name, from_version, to_version)
        except PolicyError as exc:
            fail(str(exc))
        if as_json:
            report = {"name": name, "from": from_version, "to": to_version,
                      "changes": [c.as_dict() for c in changes]}  # fmt: skip
            click.echo(json.dumps(report, indent=2))
            return
        click.echo(f"policy {name}: version {from_version} -> {to_version}")
        for c in changes:
            click.echo(f"    {c.key}: {json.dumps(c.before)} -> {json.dumps(c.after)}")
        if not changes:
            click.echo("    (no field differs)")
        return
    versions = store.history(name)
    if not versions:
        fail(f"no policy {name}")
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
         f"enabled={'yes' if v.document['enabled'] else 'no'} subject={conditions(v.document)}"]
        for v in versions
    ]  # fmt: skip
    table(rows, ["version", "action", "changed_at", "changed_by", "policy"])


@policy.command("rollback")
@click.argument("name")
@click.option("--to", "version", type=int, required=True, help="The version to restore.")
@actor_option()
@click.pass_context
def policy_rollback(ctx: click.Context, name: str, version: int, actor: str) -> None:
    """Restore policy NAME as it was at a version (recorded as a new version)."""
    try:
        stored = services_of(ctx).policy_store.rollback(name, version, actor=actor)
    except PolicyError as exc:
        fail(str(exc))
    click.echo(f"policy {name} restored to version {version} as version {stored.version}")
