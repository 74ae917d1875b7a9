"""`sidecar policy`: the exchange policies - list, show, apply, diff, export, enable, disable,
delete, history, rollback, explain.

Every command that changes a policy records who made the change (``--actor``, by default the
operating-system user) in the policy history, as the admin API records ``admin:NAME``."""

from __future__ import annotations

import getpass
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from sidecar.cli import fail, main, services_of, settings_of, table, when
from sidecar.config import ORIGINS, ConfigError, load_policies_with_origins
from sidecar.exchange.policy import Policy
from sidecar.store.policy_documents import (
    PolicyChanges,
    PolicyError,
    PolicyVersion,
    document_changes,
    policy_document,
    policy_file_text,
)

# Exit status of `apply --dry-run` and `diff` when the table differs from the file, and of
# `explain` when the exchange would be refused: distinct from 1 (the command failed) so that CI
# can branch.
EXIT_DIFFERS = 3
# History actions a policy file never makes: applying a file over them undoes them.
NOT_BY_APPLY = frozenset({"rollback", "enable", "disable"})
Command = TypeVar("Command", bound=Callable[..., Any])


def default_actor() -> str:
    """Who runs the command: the operating-system user, or "cli" when the system cannot say
    (no login name in the environment, no entry in the user database)."""
    try:
        return getpass.getuser() or "cli"
    except (KeyError, OSError):  # KeyError up to Python 3.12, OSError from 3.13 on
        return "cli"


def actor_option(recorded_in: str = "history") -> Callable[[Command], Command]:
    """``--actor``: who makes the change, recorded as given (the OS user by default)."""
    return click.option(
        "--actor",
        default=default_actor,
        show_default="the operating-system user",
        help=f"Who makes the change ({recorded_in}).",
    )


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


@policy.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def policy_show(ctx: click.Context, name: str, as_json: bool) -> None:
    """Policy NAME as the database holds it: its fields (as a policy file writes them), its
    version, and who changed it last, when."""
    stored = services_of(ctx).policy_store.get(name)
    if stored is None:
        fail(f"no policy {name}")
    document = policy_document(stored.policy)
    if as_json:
        shown = {**document, "version": stored.version, "updated_at": when(stored.updated_at),
                 "updated_by": stored.updated_by}  # fmt: skip
        click.echo(json.dumps(shown, indent=2))
        return
    # A YAML comment, then the policy as `policy export` writes it: an entry of `policies:`.
    click.echo(f"# version {stored.version}, {when(stored.updated_at)} by {stored.updated_by}")
    click.echo(policy_file_text([stored.policy]).removeprefix("policies:\n"), nl=False)


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
    for warning in drift_warnings(changes, file):
        click.echo(warning, err=True)
    if as_json:
        report = {"dry_run": dry_run, "changes": _changes_json(changes),
                  "unchanged": len(changes.unchanged)}  # fmt: skip
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


@policy.command("export")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to FILE (default: standard output).",
)
@click.pass_context
def policy_export(ctx: click.Context, output: Path | None) -> None:
    """Every policy in the database as a policy file: `policies:`, sorted by name, every field,
    no versions. `policy apply` takes it as it is (and finds nothing to change)."""
    stored = services_of(ctx).policy_store.all()
    text = policy_file_text(s.policy for s in stored)
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror}")
    click.echo(f"{len(stored)} policy(ies) written to {output}")


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
         f"enabled={'yes' if v.document['enabled'] else 'no'} subject={_conditions(v.document)}"]
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
@click.option(
    "--policies",
    "policies_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Decide with this policy (or config) file's policies, not the live table.",
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
    policies_file: Path | None,
    as_json: bool,
) -> None:
    """Print the decision the running service would make for an exchange, and why, without
    minting anything. Exit status 0 when it would be granted, 3 when refused, 2 when the
    --policies file is invalid."""
    from sidecar.cli.explain import explain, explain_lines, policies_from_file

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
    # A policy file needs no database: the proposed policies are judged before they ship.
    services = services_of(ctx, needs_schema=policies_file is None)
    try:
        proposed = policies_from_file(policies_file, services.settings) if policies_file else None
    except ConfigError as exc:
        fail("invalid policies: " + "; ".join(str(exc).splitlines()), 2)
    result = explain(
        services,
        client_id=client_id,
        audiences=audiences,
        resources=resources,
        scope=scope,
        subject=subject,
        now=int(time.time()),
        policies=proposed,
    )
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        for line in explain_lines(result):
            click.echo(line)
    if result["decision"] != "granted":
        sys.exit(EXIT_DIFFERS)
