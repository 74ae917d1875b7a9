"""`sidecar policy apply` and `sidecar policy diff`: make the policy table match a policy file,
or show how it differs, field by field, and warn of the changes that applying the file would
undo (a rollback, an enable or disable, an admin API change)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from sidecar.cli import fail, services_of, when
from sidecar.cli.actors import actor_option, default_actor
from sidecar.cli.policy import EXIT_DIFFERS, policy
from sidecar.config import ORIGINS, ConfigError, load_policies_with_origins
from sidecar.exchange.policy import Policy
from sidecar.store.policy_documents import (
    PolicyChanges,
    PolicyError,
    PolicyVersion,
    document_changes,
    policy_document,
)

# History actions a policy file never makes: applying a file over them undoes them.
NOT_BY_APPLY = frozenset({"rollback", "enable", "disable"})


def _field_lines(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    return [
        f"    {c.key}: {json.dumps(c.before)} -> {json.dumps(c.after)}"
        for c in document_changes(before, after)
    ]


def _field_diff(before: Policy, after: Policy) -> list[str]:
    return _field_lines(policy_document(before), policy_document(after))


def _new_fields(policy: Policy) -> list[str]:
    """A created policy's fields, as an update's diff prints them (its name heads them)."""
    document = policy_document(policy)
    return [f"    {key}: {json.dumps(value)}" for key, value in document.items() if key != "name"]


def _print_changes(
    changes: PolicyChanges, dry_run: bool, only_in_database: list[str] | None = None
) -> None:
    prefix = "would " if dry_run else ""
    for p in changes.created:
        click.echo(f"{prefix}create: {p.name}")
        for line in _new_fields(p):
            click.echo(line)
    for before, after in changes.updated:
        click.echo(f"{prefix}update: {after.name}")
        for line in _field_diff(before, after):
            click.echo(line)
    for p in changes.deleted:
        click.echo(f"{prefix}delete: {p.name}")
    for name in only_in_database or []:
        click.echo(f"only in the database: {name} (apply --prune would delete it)")
    count = len(changes.created) + len(changes.updated) + len(changes.deleted)
    summary = f"{count} change(s), {len(changes.unchanged)} unchanged"
    if only_in_database is not None:
        summary += f", {len(only_in_database)} only in the database"
    click.echo(summary)


def _changes_json(changes: PolicyChanges) -> list[dict[str, Any]]:
    def entry(action: str, p: Policy, **extra: Any) -> dict[str, Any]:
        return {"action": action, "name": p.name, "client_id": p.client_id,
                "audience": p.audience, **extra}  # fmt: skip

    return (
        [entry("create", p, after=policy_document(p)) for p in changes.created]
        + [
            entry("update", a, before=policy_document(b), after=policy_document(a))
            for b, a in changes.updated
        ]
        + [entry("delete", p, before=policy_document(p)) for p in changes.deleted]
    )


def _undoes(last: PolicyVersion, recreated: bool) -> bool:
    """Whether ``last``, a policy's newest version, was made other than by applying a file:
    an enable, disable or rollback, anything done through the admin API, or (for a policy the
    file creates again) its deletion."""
    return (
        last.action in NOT_BY_APPLY
        or last.changed_by.startswith("admin:")
        or (recreated and last.action == "delete")
    )


def drift_warnings(changes: PolicyChanges, file: Path) -> list[str]:
    """One line per policy whose newest version the change undoes (see :func:`_undoes`)."""
    created = {p.name for p in changes.created}
    changed = [*created, *(a.name for _, a in changes.updated), *(p.name for p in changes.deleted)]
    lines = []
    for name in changed:
        last = changes.previous.get(name)
        if last is None or not _undoes(last, name in created):
            continue
        article = "an" if last.action[0] in "aeiou" else "a"
        lines.append(
            f"warning: policy {name}: version {last.version} was {article} {last.action} by "
            f"{last.changed_by} at {when(last.changed_at)}; applying {file} undoes it"
        )
    return lines


def _load_and_compare(
    ctx: click.Context, file: Path, *, actor: str, dry_run: bool, prune: bool
) -> tuple[Any, PolicyChanges]:
    services = services_of(ctx)
    try:
        policies, origins = load_policies_with_origins(file, services.settings)
        # The check of the resulting set (the file's policies and the database's others) names
        # the file's lines, and suggests --prune for a policy only the database has.
        token = ORIGINS.set(origins)
        try:
            changes = services.policy_store.apply(
                policies, actor=actor, dry_run=dry_run, prune=prune
            )
        finally:
            ORIGINS.reset(token)
    except (ConfigError, PolicyError) as exc:
        fail("invalid policies: " + "; ".join(str(exc).splitlines()), 2)
    return services, changes


@policy.command("apply")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print what would change; change nothing.")
@click.option("--prune", is_flag=True, help="Delete policies that are not in FILE.")
@actor_option()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def policy_apply(
    ctx: click.Context, file: Path, dry_run: bool, prune: bool, actor: str, as_json: bool
) -> None:
    """Make the policy table match the `policies:` of FILE (a policy file or a config file),
    in one transaction.

    Warns (on stderr) when it changes a policy whose newest version was not made by applying a
    file: a rollback, an enable or disable, an admin API change. Exit status: 0 when the table
    matches (or was changed to match); with --dry-run, 3 when applying would change something;
    2 when FILE is invalid (nothing is changed).
    """
    _, changes = _load_and_compare(ctx, file, actor=actor, dry_run=dry_run, prune=prune)
    warnings = drift_warnings(changes, file)
    for warning in warnings:
        click.echo(warning, err=True)
    if as_json:
        report = {"dry_run": dry_run, "changes": _changes_json(changes),
                  "unchanged": len(changes.unchanged), "warnings": warnings}  # fmt: skip
        click.echo(json.dumps(report))
    else:
        _print_changes(changes, dry_run)
    if dry_run and changes.any:
        sys.exit(EXIT_DIFFERS)


@policy.command("diff")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--prune", is_flag=True, help="Show policies not in FILE as apply --prune would.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def policy_diff(ctx: click.Context, file: Path, prune: bool, as_json: bool) -> None:
    """How the policy table differs from FILE, changing nothing: what `apply FILE` would create,
    update (field by field) and, with --prune, delete; the policies only in the database; and
    the changes that applying FILE would undo (warnings, as apply prints them).

    Exit status: 0 when the table matches FILE, 3 when it differs, 2 when FILE is invalid.
    """
    services, changes = _load_and_compare(
        ctx, file, actor=default_actor(), dry_run=True, prune=prune
    )
    in_file = {p.name for p in [*changes.created, *changes.unchanged]}
    in_file.update(after.name for _, after in changes.updated)
    only_in_database = (
        [] if prune else [s.policy.name for s in services.policy_store.all()
                          if s.policy.name not in in_file]
    )  # fmt: skip
    warnings = drift_warnings(changes, file)
    for warning in warnings:
        click.echo(warning, err=True)
    identical = not changes.any and not only_in_database
    if as_json:
        report = {"identical": identical, "changes": _changes_json(changes),
                  "unchanged": len(changes.unchanged), "only_in_database": only_in_database,
                  "warnings": warnings}  # fmt: skip
        click.echo(json.dumps(report))
    else:
        _print_changes(changes, True, only_in_database)
    if not identical:
        sys.exit(EXIT_DIFFERS)
