"""`sidecar demo-init` / `demo-token`: the demo identity provider of `make run`; `sidecar demo`:
the whole story of `make demo` (sidecar/walkthrough/)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

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


# A decimal integer as YAML reads one; with a leading zero ("01234", a postcode) it stays a string.
_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")
# Named by their own options, so that a token always has them.
_OPTIONS_OF = {"sub": "--sub", "scope": "--scope", "aud": "--audience", "exp": "--ttl"}


def _typed(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    return int(text) if _INTEGER.fullmatch(text) else text


def claim_value(text: str) -> Any:
    """The value of ``--claim NAME=VALUE``: a list when it holds a comma (empty items dropped,
    so ``eng,`` is a one-item list), each item or the value typed as YAML reads a plain
    scalar: ``true``/``false`` a boolean, a decimal integer an integer, anything else a string."""
    if "," in text:
        return [_typed(item) for item in text.split(",") if item]
    return _typed(text)


def extra_claims(claims: tuple[str, ...], claims_json: tuple[str, ...]) -> dict[str, Any]:
    """The claims of --claim and --claim-json, merged; raises click.UsageError saying why."""
    from sidecar.demo import SET_BY_DEMO_TOKEN  # here: `sidecar --help` needs no cryptography

    given: list[tuple[str, Any]] = []
    for option in claims:
        name, equals, value = option.partition("=")
        if not equals or not name:
            raise click.UsageError(f"--claim {option!r}: write NAME=VALUE")
        given.append((name, claim_value(value)))
    for document in claims_json:
        try:
            parsed = json.loads(document)
        except ValueError:
            raise click.UsageError(f"--claim-json is not valid JSON: {document}") from None
        if not isinstance(parsed, dict):
            raise click.UsageError("--claim-json must be a JSON object")
        given.extend(parsed.items())
    extra: dict[str, Any] = {}
    for name, value in given:
        if name in _OPTIONS_OF:
            raise click.UsageError(f"claim {name}: give it with {_OPTIONS_OF[name]}")
        if name in SET_BY_DEMO_TOKEN:
            raise click.UsageError(f"claim {name} is set by demo-token and may not be given")
        if name in extra:
            raise click.UsageError(f"claim {name} is given twice")
        extra[name] = value
    return extra


@main.command("demo-token")
@click.option("--sub", "subject", default="alice@example.com", show_default=True)
@click.option("--scope", default="code.read code.search", show_default=True)
@click.option("--ttl", type=click.IntRange(1, 86400), default=3600, show_default=True)
@click.option("--audience", help="Default: the first audience of the first trusted issuer.")
@click.option(
    "--claim",
    "claims",
    metavar="NAME=VALUE",
    multiple=True,
    help="Add a claim (repeatable). A value with a comma is a list (groups=eng,ops; groups=eng, "
    "a one-item list); true/false are booleans, decimal integers integers, the rest strings.",
)
@click.option(
    "--claim-json",
    "claims_json",
    metavar="JSON",
    multiple=True,
    help='Add the claims of a JSON object (repeatable), e.g. \'{"groups": ["eng"]}\'.',
)
@click.pass_context
def demo_token_command(
    ctx: click.Context,
    subject: str,
    scope: str,
    ttl: int,
    audience: str | None,
    claims: tuple[str, ...],
    claims_json: tuple[str, ...],
) -> None:
    """Print a subject token signed by the demo identity provider (for trying the service).
    iss, aud, iat, exp and jti are its own; --sub, --scope, --audience and --ttl set some."""
    from sidecar.demo import demo_token

    try:
        extra = extra_claims(claims, claims_json)
    except click.UsageError as exc:
        fail(exc.message, 2)
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
            extra=extra,
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
