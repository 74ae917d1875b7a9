"""Change notifications over PostgreSQL ``LISTEN``/``NOTIFY``: a policy or key change reaches
every worker of every replica in well under a second, instead of within the refresh interval.

The bound of :mod:`sidecar.refreshing` (``policy_refresh_interval``, ``keys.refresh_interval``,
counted from the commit of a change) does not depend on this: the timers stay the backstop for a
notification lost while a listener was disconnected, and for SQLite, which has no notifications.

- Writers call :func:`notify_change` inside the transaction that makes the change: PostgreSQL
  delivers the notification when that transaction commits, and never when it rolls back (a
  refused apply, a dry run), so a listener never reloads for a change that did not happen nor
  before it is visible.
- Each worker runs one :class:`ChangeListener`: a daemon thread with a connection of its own
  (autocommit, ``LISTEN sidecar_changes``) that invalidates and reloads the matching holder.
  ``LISTEN`` needs a session connection: through a transaction-pooling proxy (PgBouncer's
  ``transaction`` mode) nothing is delivered and the timers alone keep the bound.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from sidecar.config.deployment import DatabaseConfig
from sidecar.refreshing import Refreshing

CHANNEL = "sidecar_changes"
POLICIES = "policies"
KEYS = "keys"
# How long one wait for notifications lasts (seconds): the delay of a stop.
POLL_SECONDS = 0.5
# Without any traffic for this long (seconds) the connection is checked with a query: a peer
# gone without closing the connection (a network partition, a failover) is noticed, and the
# listener reconnects, within about this long.
PING_AFTER_SECONDS = 15.0
# Reconnection back-off (seconds), doubled on each failed attempt.
MIN_BACKOFF = 0.5
MAX_BACKOFF = 15.0
APPLICATION_NAME = "token-exchange-sidecar-listen"

log = logging.getLogger(__name__)


def notify_change(session: Session, what: str) -> None:
    """Announce a change of ``what`` (:data:`POLICIES` or :data:`KEYS`) on commit of the
    session's transaction; nothing on SQLite."""
    if session.get_bind().dialect.name != "postgresql":
        return
    session.execute(text("SELECT pg_notify(:channel, :what)"), {"channel": CHANNEL, "what": what})


def listen_conninfo(database_url: str, options: DatabaseConfig | None = None) -> str | None:
    """The libpq connection string of a PostgreSQL ``database_url`` (None for another
    database), with the TLS parameters and timeouts of ``database:`` overriding the URL's own,
    as they do for the service's connections (sidecar.store.db): the listener's connection
    carries the same password. It is given to the driver, never logged."""
    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        return None
    from psycopg.conninfo import make_conninfo

    from sidecar.store.db import postgres_connect_args

    query = {k: v if isinstance(v, str) else v[-1] for k, v in url.query.items()}
    parts = {
        "host": url.host,
        "port": url.port,
        "dbname": url.database,
        "user": url.username,
        "password": url.password,
    }
    parameters = postgres_connect_args(options or DatabaseConfig.model_validate({}))
    parameters.pop("application_name")  # the listener's own, set on connect
    given = {k: v for k, v in {**parts, **query, **parameters}.items() if v is not None}
    return make_conninfo("", **given)


def _connect(conninfo: str) -> Any:
    # Not the service's bounded connection class (sidecar.store.db), which takes every wait
    # that times out for a dead server: here a wait for notifications times out by design.
    # A peer gone silent is noticed by TCP instead: keepalives while idle, and a bound on
    # unacknowledged data while a ping waits (about ten seconds either way).
    import psycopg

    # The timeouts and TLS parameters are in the conninfo (listen_conninfo).
    return psycopg.Connection.connect(
        conninfo,
        autocommit=True,
        application_name=APPLICATION_NAME,
        keepalives=1,
        keepalives_idle=5,
        keepalives_interval=2,
        keepalives_count=3,
        tcp_user_timeout=10_000,
    )


class ChangeListener:
    """Reloads ``holders[payload]`` on each notification of :data:`CHANNEL` (every holder for
    a payload it does not know), on a daemon thread of this process (start it after fork)."""

    def __init__(
        self,
        conninfo: str,
        holders: Mapping[str, Refreshing[Any]],
        *,
        connect: Callable[[str], Any] = _connect,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._conninfo = conninfo
        self._holders = dict(holders)
        self._connect = connect
        self._clock = clock
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        # Set whenever LISTEN is in effect; cleared while disconnected (tests wait on it).
        self.listening = threading.Event()
        self.connections = 0  # LISTENs in effect so far (reconnections counted)
        self.reloads = 0  # holders reloaded on a notification

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopped.clear()
        self._thread = threading.Thread(target=self._run, name="listen-changes", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopped.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        backoff = MIN_BACKOFF
        connected_before = False
        while not self._stopped.is_set():
            try:
                connection = self._connect(self._conninfo)
            except ImportError:
                log.warning("change listener: psycopg is not installed; the timers alone reload")
                return
            except Exception as exc:
                log.warning(
                    "change listener: cannot connect (%s); retrying in %.1fs",
                    type(exc).__name__,
                    backoff,
                )
            else:
                try:
                    connection.execute(f"LISTEN {CHANNEL}")
                    self.connections += 1
                    self.listening.set()
                    if connected_before:
                        log.info("change listener: listening again")
                        # What changed while nobody listened: reload what is held.
                        self._catch_up()
                    connected_before = True
                    backoff = MIN_BACKOFF
                    self._listen(connection)
                except Exception as exc:
                    if not self._stopped.is_set():
                        log.warning(
                            "change listener: connection lost (%s); reconnecting in %.1fs",
                            type(exc).__name__,
                            backoff,
                        )
                finally:
                    self.listening.clear()
                    with contextlib.suppress(Exception):  # the connection may be broken
                        connection.close()
            self._stopped.wait(backoff)
            backoff = min(MAX_BACKOFF, backoff * 2)

    def _listen(self, connection: Any) -> None:
        quiet_since = self._clock()
        while not self._stopped.is_set():
            changed = {n.payload for n in connection.notifies(timeout=POLL_SECONDS, stop_after=1)}
            if changed:
                # A burst (an apply of many policies, several writers) is one reload each. Not
                # nested in the first generator: it holds the connection's lock until closed.
                changed.update(n.payload for n in connection.notifies(timeout=0))
                self._reload(changed)
                quiet_since = self._clock()
            elif self._clock() - quiet_since >= PING_AFTER_SECONDS:
                connection.execute("SELECT 1")
                quiet_since = self._clock()

    def _reload(self, payloads: Iterable[str]) -> None:
        names: set[str] = set()
        for payload in payloads:
            names.update([payload] if payload in self._holders else self._holders)
        for name in sorted(names):
            holder = self._holders[name]
            # Invalidated first: while this thread reloads, a request waits for the load (or is
            # refused if it fails) instead of deciding on the copy the change made stale.
            holder.invalidate()
            try:
                holder.refresh()
            except Exception as exc:
                log.warning(
                    "change listener: reloading %s failed: %s", holder.name, type(exc).__name__
                )
            self.reloads += 1

    def _catch_up(self) -> None:
        for holder in self._holders.values():
            if holder.current is None:
                continue  # nothing held yet: the first use loads it
            try:
                holder.refresh()
            except Exception as exc:
                log.warning(
                    "change listener: reloading %s failed: %s", holder.name, type(exc).__name__
                )
