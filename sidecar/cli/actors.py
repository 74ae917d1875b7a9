"""Who makes a change from the command line: the ``--actor`` option of the commands that change
a policy or the keyring, recorded in the policy history or the audit log (by default the
operating-system user, as the admin API records ``admin:NAME``)."""

from __future__ import annotations

import getpass
from collections.abc import Callable
from typing import Any, TypeVar

import click

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
