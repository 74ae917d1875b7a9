"""`sidecar audit tail|search`: the audit trail as operators read it (times in RFC 3339 UTC)."""

from __future__ import annotations

import datetime
import json
from typing import Any

import click

from sidecar.cli import fail, main, services_of, table
from sidecar.logs import rfc3339
from sidecar.store.actions import CHANGES


@main.group()
def audit() -> None:
    """The audit trail of /token decisions."""


def _moment(text: str | None, option: str) -> float | None:
    """An RFC 3339 time (``2026-12-07T04:00:00Z``, or with an offset) as epoch seconds."""
    if text is None:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        fail(f"{option}: {text!r} is not an RFC 3339 time such as 2026-12-07T04:00:00Z", 2)
    if moment.tzinfo is None:
        fail(f"{option}: {text!r} has no time zone (end it with Z for UTC)", 2)
    return moment.timestamp()


def _rfc3339(epoch: float | None) -> str | None:
    return None if epoch is None else rfc3339(epoch)


def _show(records: list[dict[str, Any]], as_json: bool) -> None:
    for record in records:
        record["at"] = _rfc3339(record["at"])
        record["expires_at"] = _rfc3339(record["expires_at"])
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    table(
        [
            [
                str(r["at"]),
                r["decision"],
                r["error"] or "-",
                r["client_id"] or "-",
                r["subject"] or "-",
                r["actor"] or "-",
                " ".join(r["audiences"]) or "-",
                r["jti"] or r["kid"] or "-",
                r["policies"] or "-",
                r["reason"] or "-",
            ]
            for r in records
        ],
        [
            "at",
            "decision",
            "error",
            "client",
            "subject",
            "actor",
            "audiences",
            "jti/kid",
            "policies",
            "reason",
        ],
    )


def _query(ctx: click.Context, **where: Any) -> list[dict[str, Any]]:
    from sidecar.store.audit_query import AuditFilter, search

    services = services_of(ctx)
    try:
        return search(services.engine, AuditFilter(**where))
    finally:
        services.engine.dispose()


@audit.command("tail")
@click.option(
    "-n", "--lines", "limit", type=click.IntRange(1, 10_000), default=20, show_default=True
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def audit_tail(ctx: click.Context, limit: int, as_json: bool) -> None:
    """The newest exchanges and policy and key changes, newest first."""
    _show(_query(ctx, limit=limit), as_json)


@audit.command("search")
@click.option("--since", help="From this RFC 3339 time (inclusive).")
@click.option("--until", help="Before this RFC 3339 time.")
@click.option("--client", "client_id", help="The authenticated client.")
@click.option("--subject", help="The subject token's sub.")
@click.option("--audience", help="One of the requested audiences or resources.")
@click.option(
    "--outcome",
    "decision",
    type=click.Choice(["granted", "denied", *CHANGES]),
    help="An exchange's outcome, or a change (policy_update, key_rotate, ...).",
)
@click.option(
    "--kind",
    type=click.Choice(["exchange", "change"]),
    help="Only exchanges, or only policy and key changes.",
)
@click.option("--jti", help="The minted token's jti.")
@click.option("--kid", help="The signing key's kid.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def audit_search(
    ctx: click.Context,
    since: str | None,
    until: str | None,
    client_id: str | None,
    subject: str | None,
    audience: str | None,
    decision: str | None,
    kind: str | None,
    jti: str | None,
    kid: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Exchanges and changes matching every option given, newest first."""
    found = _query(
        ctx,
        since=_moment(since, "--since"),
        until=_moment(until, "--until"),
        client_id=client_id,
        subject=subject,
        audience=audience,
        decision=decision,
        kind=kind,
        jti=jti,
        kid=kid,
        limit=limit,
    )
    _show(found, as_json)
