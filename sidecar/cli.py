"""The ``sidecar`` command line (DESIGN §5).

Every command reads the configuration from ``--config PATH`` or ``SIDECAR_CONFIG``, exits
non-zero with a one-line reason on failure, and prints JSON with ``--json`` where it lists.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from sidecar import REPO_ROOT
from sidecar.config import ConfigError, Settings, load_policies_file, load_settings
from sidecar.keys.directory import KeyDirectoryError
from sidecar.keys.encryption import KeyDecryptionError

# In the checkout's keys/ (git-ignored), wherever the command runs from: deploy/demo.yaml finds
# the JWKS there relative to itself.
DEMO_IDP_KEY = REPO_ROOT / "keys" / "demo-idp.key.pem"
DEMO_IDP_JWKS = REPO_ROOT / "keys" / "demo-idp.jwks.json"


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"sidecar: error: {message}", err=True)
    sys.exit(code)


def _settings(ctx: click.Context) -> Settings:
    path = ctx.find_root().params.get("config")
    if not path:
        fail("no configuration: pass --config PATH or set SIDECAR_CONFIG", 2)
    try:
        return load_settings(path)
    except ConfigError as exc:
        fail("invalid configuration: " + "; ".join(str(exc).splitlines()), 2)


def _services(ctx: click.Context, *, needs_schema: bool = True) -> Any:
    from sidecar.services import Services
    from sidecar.store import migrate

    services = Services(_settings(ctx))
    if needs_schema and not migrate.is_current(services.engine):
        fail("the database schema is not current: run `sidecar db upgrade`")
    return services


def _database_reason(exc: Exception) -> str:
    # The driver's first line only: the rest quotes the SQL statement and its parameters.
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"database error: {type(exc).__name__}" + (f": {detail[0]}" if detail else "")


class _Main(click.Group):
    """The root group: a database or key-decryption failure in any command ends as a
    one-line reason, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (KeyDecryptionError, KeyDirectoryError) as exc:
            fail(str(exc))
        except Exception as exc:
            # Imported here: `--help` and check-config need no SQLAlchemy.
            from sqlalchemy.exc import SQLAlchemyError

            if isinstance(exc, SQLAlchemyError):
                fail(_database_reason(exc))
            raise


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(str(v)) for v in column) for column in zip(headers, *rows, strict=False)]
    for row in [headers, *rows]:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=False)).rstrip())


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    envvar="SIDECAR_CONFIG",
    type=click.Path(dir_okay=False),
    help="Configuration file (default: $SIDECAR_CONFIG).",
)
def main(config: str | None) -> None:
    """token-exchange-sidecar: an OAuth 2.0 Token Exchange (RFC 8693) service."""


@main.command("check-config")
@click.pass_context
def check_config(ctx: click.Context) -> None:
    """Validate the configuration and exit."""
    settings = _settings(ctx)
    if missing := settings.missing_files():
        fail("invalid configuration: " + "; ".join(missing), 2)
    click.echo(
        f"configuration OK: issuer {settings.issuer}, {len(settings.trusted_issuers)} trusted "
        f"issuer(s), {len(settings.clients)} client(s), {len(settings.policies)} policy(ies)"
    )


@main.command()
@click.option("--bind", help="HOST:PORT to listen on (default 127.0.0.1:8080).")
@click.option("--workers", type=click.IntRange(1, 64), help="Number of worker processes.")
@click.option(
    "--gunicorn-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="gunicorn settings file (default deploy/gunicorn.conf.py).",
)
@click.pass_context
def serve(
    ctx: click.Context, bind: str | None, workers: int | None, gunicorn_config: Path | None
) -> None:
    """Serve the token endpoint under gunicorn."""
    from sidecar.server import serve as run_server

    # prepare() migrates an embedded SQLite database itself and checks the schema otherwise.
    services = _services(ctx, needs_schema=False)
    if missing := services.settings.missing_files():
        fail("invalid configuration: " + "; ".join(missing), 2)
    try:
        services.prepare()
    except (KeyDecryptionError, KeyDirectoryError) as exc:
        fail(str(exc))
    except Exception as exc:
        fail(f"cannot start: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    finally:
        services.engine.dispose()
    run_server(services.settings, bind=bind, workers=workers, config_file=gunicorn_config)


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Run the migrations up to the newest schema."""
    from sidecar.store import migrate

    services = _services(ctx, needs_schema=False)
    try:
        migrate.upgrade(services.engine)
    except Exception as exc:
        fail(f"migration failed: {type(exc).__name__}")
    click.echo(f"database at revision {migrate.current_revision(services.engine)}")


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
            "created": _when(k.created_at),
            "activates": _when(k.activates_at),
            "retires": _when(k.retires_at),
            "removed": _when(k.removes_at),
        }
        for k in keyring.keys
    ]


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def keys_list(ctx: click.Context, as_json: bool) -> None:
    """List signing keys with their state."""
    try:
        rows = _key_rows(_services(ctx))
    except KeyDecryptionError as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    headers = ["kid", "algorithm", "state", "created", "activates", "retires", "removed"]
    _table([[row[h] for h in headers] for row in rows], headers)


@keys.command("rotate")
@click.option("--now", "immediate", is_flag=True, help="Sign with the new key at once.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def keys_rotate(ctx: click.Context, immediate: bool, as_json: bool) -> None:
    """Start a rotation: the new key signs after keys.publish_ahead (or at once with --now)."""
    services = _services(ctx)
    if immediate:
        click.echo(
            "warning: --now skips publish-ahead; verifiers with a cached JWKS may reject tokens "
            "until they refetch it",
            err=True,
        )
    key = services.keys.rotate(immediate=immediate)
    result = {"kid": key.kid, "algorithm": key.algorithm, "activates": _when(key.activates_at)}
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"new key {key.kid} ({key.algorithm}) signs from {result['activates']}")


@keys.command("retire")
@click.argument("kid")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def keys_retire(ctx: click.Context, kid: str, as_json: bool) -> None:
    """Stop signing with KID now; it stays published for keys.retain_after."""
    services = _services(ctx)
    current = services.keys.load().current(services.clock())
    if not services.keys.retire(kid):
        fail(f"no key {kid}")
    if current is not None and current.kid == kid:
        click.echo(
            "warning: the retired key was signing; the next key signs at once, and verifiers "
            "with a cached JWKS may reject its tokens until they refetch it",
            err=True,
        )
    services.keys.ensure_current()
    signing = services.keys.load().current(services.clock())
    result = {"retired": kid, "signing": signing.kid if signing else None}
    click.echo(json.dumps(result) if as_json else f"key {kid} retired; {result['signing']} signs")


@main.group()
def policy() -> None:
    """Exchange policies."""


@policy.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def policy_list(ctx: click.Context, as_json: bool) -> None:
    """List the policies in the database."""
    from sidecar.store.policies import policy_document

    documents = [policy_document(p) for p in _services(ctx).policy_store.load()]
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
    _table(rows, headers)


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
    services = _services(ctx)
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


def _demo_paths(ctx: click.Context) -> tuple[Path, Path]:
    """The demo IdP's private key and JWKS: beside the first trusted issuer's jwks_file when a
    configuration is given, else in the checkout's keys/ (where deploy/demo.yaml looks)."""
    if ctx.find_root().params.get("config"):
        jwks_file = _settings(ctx).trusted_issuers[0].jwks_file
        if jwks_file is not None:
            jwks = _settings(ctx).resolve_path(jwks_file)
            return jwks.with_name(DEMO_IDP_KEY.name), jwks
    return DEMO_IDP_KEY, DEMO_IDP_JWKS


@main.command("demo-init")
@click.pass_context
def demo_init(ctx: click.Context) -> None:
    """Create the demo identity provider's key pair (once): beside the configuration's first
    jwks_file, or in keys/ without --config."""
    from sidecar.demo import init_demo_idp

    private_key, jwks = _demo_paths(ctx)
    created = init_demo_idp(private_key, jwks)
    click.echo(f"{'created' if created else 'kept'} {private_key} and {jwks}")


@main.command("demo-token")
@click.option("--sub", "subject", default="alice@example.com", show_default=True)
@click.option("--scope", default="code.read code.search", show_default=True)
@click.option("--ttl", type=click.IntRange(1, 86400), default=3600, show_default=True)
@click.option("--audience", help="Default: the first audience of the first trusted issuer.")
@click.pass_context
def demo_token_command(
    ctx: click.Context, subject: str, scope: str, ttl: int, audience: str | None
) -> None:
    """Print a subject token signed by the demo identity provider (for trying the service)."""
    from sidecar.demo import demo_token

    settings = _settings(ctx)
    private_key, _ = _demo_paths(ctx)
    if not private_key.exists():
        fail(f"{private_key} not found: run `sidecar demo-init` (make run does)")
    trusted = settings.trusted_issuers[0]
    click.echo(
        demo_token(
            private_key,
            issuer=trusted.issuer,
            audience=audience or trusted.audiences[0],
            subject=subject,
            scope=scope,
            ttl=ttl,
        )
    )
