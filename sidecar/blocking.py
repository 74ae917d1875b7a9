"""Work that waits on I/O, kept off the event loop.

Under gunicorn's asyncio worker (the default, see :mod:`sidecar.web.asgi`) a ``/token`` request is
answered on the event loop thread itself, with no hand-off to a thread: the exchange is CPU work
over in-process state (caches, policies, keys). The few steps that would wait on the network or
the database call :func:`may_block` first. On the event loop that raises :class:`WouldBlock`
before anything is waited for, and the bridge answers the request again, from the start, on a
thread of its pool, where waiting is allowed. Nothing the first attempt did is kept: it sent
nothing and recorded nothing, and what it cached (a verified subject token) is valid regardless.

Steps that call it: a JWKS fetch a request would wait for (no keys cached, an unknown ``kid``), a
first load of the policies or the keyring, and the audit trail's backpressure wait. Requests that
authenticate with a client assertion (``private_key_jwt``, whose ``jti`` is recorded in the
database) are sent to the pool by the bridge without an attempt on the loop.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class WouldBlock(Exception):
    """Raised by :func:`may_block` on a thread that must not wait."""


_state = threading.local()


def may_block() -> None:
    """Call before waiting on I/O: raises WouldBlock on the event loop thread."""
    if getattr(_state, "inline", False):
        raise WouldBlock


def on_event_loop_thread() -> bool:
    """True within :func:`on_event_loop` on this thread."""
    return bool(getattr(_state, "inline", False))


@contextmanager
def on_event_loop() -> Iterator[None]:
    """Within this block, on this thread, :func:`may_block` raises."""
    previous = getattr(_state, "inline", False)
    _state.inline = True
    try:
        yield
    finally:
        _state.inline = previous
