"""`sidecar keys`: the signing keyring."""

from __future__ import annotations

import json
from typing import Any

import click

from sidecar.cli import fail, main, services_of, table, when
from sidecar.cli.actors import actor_option


@main.group()
def keys() -> None:
    """Signing keys."""


def _key_rows(services: Any) -> list[dict[str, Any]]:
    keyring = services.keys.load()
    now = services.clock()
    current = keyring.current(now)
    return [
        {
            "kid": k.kid,
            "algorithm": k.algorithm,
            "state": "current" if current is not None and k.kid == current.kid else k.state(now),
            "created": when(k.created_at),
            "activates": when(k.activates_at),
            "retires": when(k.retires_at),
            "removed": when(k.removes_at),
        }
        for k in keyring.keys
    ]


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def keys_list(ctx: click.Context, as_json: bool) -> None:
    """List signing keys with their state."""
    rows = _key_rows(services_of(ctx))  # KeyDecryptionError: one line, by the root group
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    headers = ["kid", "algorithm", "state", "created", "activates", "retires", "removed"]
    table([[row[h] for h in headers] for row in rows], headers)


@keys.command("rotate")
@click.option("--now", "immediate", is_flag=True, help="Sign with the new key at once.")
@actor_option("audit")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def keys_rotate(ctx: click.Context, immediate: bool, actor: str, as_json: bool) -> None:
    """Start a rotation: the new key signs after keys.publish_ahead (or at once with --now)."""
    services = services_of(ctx)
    key = services.keys.rotate(immediate=immediate, actor=actor)
    if immediate:
        click.echo(
            "warning: --now skips publish-ahead; verifiers with a cached JWKS may reject tokens "
            "until they refetch it",
            err=True,
        )
    result = {"kid": key.kid, "algorithm": key.algorithm, "activates": when(key.activates_at)}
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"new key {key.kid} ({key.algorithm}) signs from {result['activates']}")


# A kid is base64url and may start with "-": it must not be taken for an option.
@keys.command("retire", context_settings={"ignore_unknown_options": True})
@click.argument("kid")
@actor_option("audit")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def keys_retire(ctx: click.Context, kid: str, actor: str, as_json: bool) -> None:
    """Stop signing with KID now; it stays published for keys.retain_after."""
    services = services_of(ctx)
    current = services.keys.load().current(services.clock())
    if not services.keys.retire(kid, actor=actor):
        fail(f"no key {kid}")
    if current is not None and current.kid == kid:
        click.echo(
            "warning: the retired key was signing; the next key signs at once, and verifiers "
            "with a cached JWKS may reject its tokens until they refetch it",
            err=True,
        )
    services.keys.ensure_current(actor=actor)
    signing = services.keys.load().current(services.clock())
    result = {"retired": kid, "signing": signing.kid if signing else None}
    click.echo(json.dumps(result) if as_json else f"key {kid} retired; {result['signing']} signs")
