"""`sidecar policy`: the exchange policies - list, show, apply, diff, export, enable, disable,
delete, history, rollback, explain.

Every command that changes a policy records who made the change (``--actor``, by default the
operating-system user) in the policy history, as the admin API records ``admin:NAME``.

This module holds the group, the commands that read the table (list, show, export, explain)
and what the others share; apply and diff are in :mod:`sidecar.cli.policy_apply`, the commands
on a policy's versions in :mod:`sidecar.cli.policy_versions`, `policy test` in
:mod:`sidecar.cli.policy_test`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from sidecar.cli import fail, main, services_of, settings_of, table, when

# Re-exported: their import path before they had a module of their own.
from sidecar.cli.actors import actor_option as actor_option
from sidecar.cli.actors import default_actor as default_actor
from sidecar.config import ConfigError
from sidecar.store.policy_documents import policy_document, policy_file_text

# Exit status of `apply --dry-run` and `diff` when the table differs from the file, and of
# `explain` when the exchange would be refused: distinct from 1 (the command failed) so that CI
# can branch.
EXIT_DIFFERS = 3


@main.group()
def policy() -> None:
    """Exchange policies."""


def conditions(document: dict[str, Any]) -> str:
    """A policy document's issuer and subject conditions on one line, as list and history
    print them."""
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
        [d["name"], d["client_id"], d["audience"], conditions(d), " ".join(d["scopes"]),
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
