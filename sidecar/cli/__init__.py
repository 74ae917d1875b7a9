"""The ``sidecar`` command line (docs/design.md §5).

Every command reads the configuration from ``--config PATH`` or ``SIDECAR_CONFIG``, exits
non-zero with a one-line reason on failure, and prints JSON with ``--json`` where it lists.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from sidecar.config import ConfigError, Settings, load_settings
from sidecar.keys.encryption import KeyDecryptionError
from sidecar.store.key_directory import KeyDirectoryError


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"sidecar: error: {message}", err=True)
    sys.exit(code)


def settings_of(ctx: click.Context) -> Settings:
    path = ctx.find_root().params.get("config")
    if not path:
        fail("no configuration: pass --config PATH or set SIDECAR_CONFIG", 2)
    try:
        return load_settings(path)
    except ConfigError as exc:
        fail("invalid configuration: " + "; ".join(str(exc).splitlines()), 2)


def services_of(ctx: click.Context, *, needs_schema: bool = True, unready_exit: int = 1) -> Any:
    """The services of the configuration; ``unready_exit``: the exit status when the database
    schema is not current (a command whose 1 means something else passes another)."""
    from sidecar.services import Services
    from sidecar.store import migrate

    services = Services(settings_of(ctx))
    if needs_schema and not migrate.is_current(services.engine):
        fail("the database schema is not current: run `sidecar db upgrade`", unready_exit)
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


def when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def table(rows: list[list[str]], headers: list[str]) -> None:
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
    settings = settings_of(ctx)
    if missing := settings.missing_files():
        fail("invalid configuration: " + "; ".join(missing), 2)
    for weakness in settings.weaknesses():
        click.echo(f"warning: {weakness}", err=True)
    click.echo(
        f"configuration OK: issuer {settings.issuer}, {len(settings.trusted_issuers)} trusted "
        f"issuer(s), {len(settings.clients)} client(s), {len(settings.policies)} policy(ies)"
    )


@main.command()
@click.option("--bind", help="HOST:PORT to listen on (default 127.0.0.1:8080).")
@click.option("--workers", type=click.IntRange(1, 64), help="Number of worker processes.")
@click.option(
    "--server",
    "server_name",
    type=click.Choice(["granian", "gunicorn"]),
    help="HTTP server (default: server.kind in the configuration, granian).",
)
@click.option(
    "--gunicorn-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="gunicorn settings file, with --server gunicorn.",
)
@click.pass_context
def serve(
    ctx: click.Context,
    bind: str | None,
    workers: int | None,
    server_name: str | None,
    gunicorn_config: Path | None,
) -> None:
    """Serve the token endpoint (granian by default, or gunicorn)."""
    settings = settings_of(ctx)
    config_path = Path(str(ctx.find_root().params["config"])).resolve()
    kind = server_name or settings.server.kind
    if gunicorn_config is not None and kind != "gunicorn":
        fail("--gunicorn-config applies to the gunicorn server only", 2)
    from sidecar.serving.common import configure_logging

    configure_logging(settings.log.format)  # the preparation's warnings too, in the format
    if kind == "granian":  # before any preparation: a second instance touches nothing
        from sidecar.serving.granian import granian_listeners, refuse_ports_in_use

        refuse_ports_in_use(granian_listeners(settings, bind=bind, workers=workers))
    _in_child_process(_prepare_to_serve, settings)
    if kind == "gunicorn":
        from sidecar.serving.gunicorn import serve_gunicorn

        serve_gunicorn(
            config_path, settings, bind=bind, workers=workers, server_config=gunicorn_config
        )
        return
    from sidecar.serving.granian import serve_granian

    serve_granian(config_path, settings, bind=bind, workers=workers)


def _prepare_to_serve(settings: Settings) -> None:
    """The checks and preparation before serving: files, database (prepare() migrates an
    embedded SQLite database itself and checks the schema otherwise), signing keys."""
    from sidecar.services import Services

    if missing := settings.missing_files():
        fail("invalid configuration: " + "; ".join(missing), 2)
    services = Services(settings)
    try:
        services.prepare()
    except (KeyDecryptionError, KeyDirectoryError) as exc:
        fail(str(exc))
    except Exception as exc:
        fail(f"cannot start: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    finally:
        services.engine.dispose()


def _in_child_process(step: Callable[[Settings], None], settings: Settings) -> None:
    """Run ``step`` in a forked child and exit as it did if it failed. The server's master forks
    every worker: what the step builds (its services, the migration tooling it imports) would
    otherwise stay in the master, and be copied into the memory of every worker."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            step(settings)
            code = 0
        except SystemExit as exc:  # fail() printed why
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(code if code > 0 else 1)


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Run the migrations up to the newest schema."""
    from sidecar.store import migrate

    services = services_of(ctx, needs_schema=False)
    try:
        migrate.upgrade(services.engine)
    except Exception as exc:
        fail(f"migration failed: {type(exc).__name__}")
    click.echo(f"database at revision {migrate.current_revision(services.engine)}")


@db.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def db_check(ctx: click.Context, as_json: bool) -> None:
    """Connect, and report the schema revision against the newest one (exit 1: unreachable or
    not current)."""
    import time

    from sqlalchemy.engine import make_url

    from sidecar.store import migrate
    from sidecar.store.db import make_engine, ping

    settings = settings_of(ctx)
    url = make_url(settings.database_url)
    result: dict[str, Any] = {
        "backend": url.get_backend_name(),
        # Host and database only: never the user or the password.
        "database": url.database,
        "host": url.host,
        "head_revision": migrate.head_revision(),
    }
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
        # Checking must not create the database it checks.
        result.update(reachable=False, revision=None, error=f"no database file at {url.database}")
        _report_db_check(result, as_json)
    engine = make_engine(settings.database_url, settings.database)
    started = time.monotonic()
    try:
        ping(engine)
        result["reachable"] = True
        result["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
        result["revision"] = migrate.current_revision(engine)
    except Exception as exc:
        result["reachable"] = False
        result["revision"] = None
        result["error"] = _database_reason(exc)
    finally:
        engine.dispose()
    _report_db_check(result, as_json)


def _report_db_check(result: dict[str, Any], as_json: bool) -> NoReturn:
    import json

    result["current"] = result["revision"] == result["head_revision"]
    if as_json:
        click.echo(json.dumps(result, indent=2))
    elif result["reachable"]:
        state = "current" if result["current"] else "NOT current: run `sidecar db upgrade`"
        click.echo(
            f"{result['backend']} reachable in {result['latency_ms']} ms; schema revision "
            f"{result['revision']} (newest {result['head_revision']}): {state}"
        )
    else:
        click.echo(f"{result['backend']} unreachable: {result['error']}")
    sys.exit(0 if result["reachable"] and result["current"] else 1)


# The command groups live in modules of their own; importing them registers their commands.
from sidecar.cli import (  # noqa: E402, F401
    audit,
    demo,
    keys,
    policy,
    policy_apply,
    policy_test,
    policy_versions,
    upstreams,
)
