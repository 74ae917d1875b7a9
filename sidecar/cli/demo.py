"""`sidecar demo-init` / `demo-token`: the demo identity provider of `make run`; `sidecar demo`:
the whole story of `make demo` (sidecar/walkthrough.py)."""

from __future__ import annotations

from pathlib import Path

import click

from sidecar.cli import fail, main, settings_of

# Without --config: in keys/ of the working directory (git-ignored in the checkout, where
# `make run` runs it and deploy/demo.yaml finds the JWKS relative to itself).
DEMO_IDP_KEY = Path("keys") / "demo-idp.key.pem"
DEMO_IDP_JWKS = Path("keys") / "demo-idp.jwks.json"


def _demo_paths(ctx: click.Context) -> tuple[Path, Path]:
    """The demo IdP's private key and JWKS: beside the first trusted issuer's jwks_file when a
    configuration is given, else in keys/ of the working directory (where deploy/demo.yaml
    looks when run from the checkout)."""
    if ctx.find_root().params.get("config"):
        jwks_file = settings_of(ctx).trusted_issuers[0].jwks_file
        if jwks_file is not None:
            jwks = settings_of(ctx).resolve_path(jwks_file)
            return jwks.with_name(DEMO_IDP_KEY.name), jwks
    return DEMO_IDP_KEY, DEMO_IDP_JWKS


@main.command("demo-init")
@click.pass_context
def demo_init(ctx: click.Context) -> None:
    """Create the demo identity provider's key pair (once): beside the configuration's first
    jwks_file, or in keys/ without --config."""
    from sidecar.demo import DemoKeyConflict, init_demo_idp

    private_key, jwks = _demo_paths(ctx)
    try:
        created = init_demo_idp(private_key, jwks)
    except DemoKeyConflict as exc:
        fail(str(exc))
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

    settings = settings_of(ctx)
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


@main.command("demo")
@click.option("--keep", is_flag=True, help="Keep the temporary directory (config, db, log).")
def demo_command(keep: bool) -> None:
    """Show the whole idea on loopback: a demo IdP, this sidecar, a gateway and two upstreams;
    a few calls, and what each hop presented and why it was accepted or refused."""
    from sidecar.walkthrough import DemoFailed, run_demo, stop_on_sigterm

    stop_on_sigterm()  # so that `kill` stops the demo's sidecar too, as Ctrl-C does
    try:
        run_demo(keep=keep)
    except DemoFailed as exc:
        fail(str(exc))
