"""Who makes a change from the command line: the ``--actor`` option of the commands that change
a policy or the keyring, recorded in the policy history or the audit log (by default the
operating-system user, as the admin API records ``admin:NAME``)."""

from __future__ import annotations

import getpass
from collections.abc import Callable
from typing import Any, TypeVar

import click

Command = TypeVar("Command", bound=Callable[..., Any])

# Actors the service itself records: a command-line change may not pass for one of them.
RESERVED = ("bootstrap", "sidecar")
ADMIN_PREFIX = "admin:"
MAX_LENGTH = 255  # the history's and the audit table's column


def default_actor() -> str:
    """Who runs the command: the operating-system user, or "cli" when the system cannot say
    (no login name in the environment, no entry in the user database). A user named like an
    actor the service records (the image's user is "sidecar") is recorded as ``os:NAME``."""
    try:
        user = getpass.getuser() or "cli"
    except (KeyError, OSError):  # KeyError up to Python 3.12, OSError from 3.13 on
        return "cli"
    return f"os:{user}" if _reserved(user) else user


def _reserved(actor: str) -> bool:
    return actor in RESERVED or actor.startswith(ADMIN_PREFIX)


def checked_actor(_context: click.Context, _parameter: click.Parameter, value: str) -> str:
    """A name that is not empty, fits the column, and cannot be mistaken for a change the
    service or the admin API made (drift warnings and audits tell those apart by the name)."""
    actor = value.strip()
    if not actor:
        raise click.BadParameter("must name who makes the change")
    if len(actor) > MAX_LENGTH:
        raise click.BadParameter(f"at most {MAX_LENGTH} characters")
    if _reserved(actor):
        raise click.BadParameter(
            f"{actor!r} is how the service records its own changes ({', '.join(RESERVED)}) or "
            f"the admin API's ({ADMIN_PREFIX}NAME); name yourself"
        )
    if not actor.isprintable():
        raise click.BadParameter("control characters are not allowed")
    return actor


def actor_option(recorded_in: str = "history") -> Callable[[Command], Command]:
    """``--actor``: who makes the change, recorded as given (the OS user by default)."""
    return click.option(
        "--actor",
        default=default_actor,
        show_default="the operating-system user",
        callback=checked_actor,
        help=f"Who makes the change ({recorded_in}); not bootstrap, sidecar or admin:NAME.",
    )
