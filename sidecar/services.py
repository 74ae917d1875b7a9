"""Everything a running service holds, built once per process from the settings: the database,
the stores, the in-process caches and the token-exchange grant."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, select

from sidecar.audit import AuditTrail
from sidecar.clients import ClientAuthenticator
from sidecar.config import Settings, check_policy_set
from sidecar.errors import TemporarilyUnavailableError
from sidecar.exchange.caches import MintedTokenCache, SubjectTokenCache
from sidecar.exchange.grant import TokenExchangeGrant
from sidecar.exchange.policy import PolicySet
from sidecar.issuers import IssuerDirectory
from sidecar.jwks import fetch_json
from sidecar.keys.keyring import Keyring, SigningKey
from sidecar.ratelimit import RateLimiter
from sidecar.refreshing import Refreshing
from sidecar.store.db import is_sqlite, make_engine, make_sessionmaker, ping
from sidecar.store.jtis import JtiStore
from sidecar.store.key_directory import DirectoryKeyStore
from sidecar.store.keys import KeyStore
from sidecar.store.models import PolicyVersionRow
from sidecar.store.notify import KEYS, POLICIES, ChangeListener, listen_conninfo
from sidecar.store.policies import PolicyStore
from sidecar.upstreams import ConfiguredUpstreams

log = logging.getLogger(__name__)


class Services:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        fetch: Callable[[str, float], Any] = fetch_json,
        engine: Engine | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.engine = engine or make_engine(settings.database_url, settings.database)
        sessions = make_sessionmaker(self.engine)
        self.keys: KeyStore | DirectoryKeyStore
        if settings.keys.directory is not None:
            self.keys = DirectoryKeyStore(
                settings.resolve_path(settings.keys.directory),
                preferred_algorithm=settings.tokens.algorithm,
                publish_ahead=settings.keys.publish_ahead,
                clock=clock,
            )
        else:
            self.keys = KeyStore(sessions, settings.keys, settings.tokens.algorithm, clock)
        self.policy_store = PolicyStore(
            sessions, clock, validate=lambda policies: check_policy_set(policies, settings)
        )
        self.audit = AuditTrail(self.engine, retention=settings.audit.retention)
        self.issuers = IssuerDirectory(settings, clock, fetch)
        self.authenticator = ClientAuthenticator(settings, JtiStore(sessions, clock), clock, fetch)
        self.rate_limiter = RateLimiter(settings, clock)
        # Set when the worker received SIGTERM: readiness turns false while in-flight requests
        # finish (gunicorn: sidecar/serving/gunicorn_conf.py; granian has no such hook).
        self.draining = threading.Event()
        self.keyring: Refreshing[Keyring] = Refreshing(
            "keyring", self.keys.maintain, settings.keys.refresh_interval, clock
        )
        self.policies: Refreshing[PolicySet] = Refreshing(
            "policies",
            lambda: self.policy_store.load_if_changed(self.policies.current),
            settings.policy_refresh_interval,
            clock,
        )
        # Started by start_background, on PostgreSQL only (sidecar.store.notify).
        self.listener: ChangeListener | None = None
        caches = settings.caches
        self.upstreams = ConfiguredUpstreams.from_settings(settings)
        self.grant = TokenExchangeGrant(
            upstreams=self.upstreams,
            issuer=settings.issuer,
            max_ttl=settings.tokens.max_ttl,
            leeway=settings.tokens.leeway,
            issuers=self.issuers,
            subject_cache=(
                SubjectTokenCache(self.issuers, caches.subject_tokens.max_entries)
                if caches.subject_tokens.enabled
                else None
            ),
            minted_cache=(
                MintedTokenCache(
                    caches.minted_tokens.max_entries, caches.minted_tokens.min_remaining
                )
                if caches.minted_tokens.enabled
                else None
            ),
        )

    def signing_key(self) -> SigningKey:
        key = self.keyring.get().current(self.clock())
        if key is None:
            raise TemporarilyUnavailableError(reason="no signing key")
        return key

    def prepare(self, *, migrate_sqlite: bool = True) -> None:
        """Start-up work done once, before serving: migrate an embedded SQLite database, check
        the schema is current, make sure a key signs (and that every stored key decrypts), and
        bootstrap the policy table from the config when it never held a policy."""
        # Imported here: Alembic is start-up work of the serving command, not of each worker.
        from sidecar.store import migrate

        if migrate_sqlite and is_sqlite(self.settings.database_url):
            migrate.upgrade(self.engine)
        if not migrate.is_current(self.engine):
            raise RuntimeError("the database schema is not current: run `sidecar db upgrade`")
        self.keys.ensure_current()  # raises KeyDirectoryError for a directory without keys
        self.keys.load()  # raises KeyDecryptionError on a wrong keys.encryption_key
        for weakness in self.settings.weaknesses():
            log.warning("weak configuration: %s", weakness)
        if isinstance(self.keys, KeyStore):
            if self.keys.encrypts:
                encrypted = self.keys.encrypt_stored_keys()
                if encrypted:
                    log.info("encrypted %d signing key(s) stored in clear text", encrypted)
            else:
                log.warning(
                    "SIGNING KEYS ARE STORED UNENCRYPTED in the database: set "
                    "keys.encryption_key to encrypt them at rest"
                )
        # Only a table that never held a policy: one emptied on purpose (every policy deleted,
        # its history kept) stays empty, denying every exchange, across restarts.
        if self.settings.policies and not self.policy_history_exists():
            changes = self.policy_store.apply(self.settings.policies, actor="bootstrap")
            log.info(
                "policy table was new: applied %d policies from the config", len(changes.created)
            )

    def start_background(self) -> None:
        """In a serving worker, after the fork: reload the policies and the keyring on timers,
        so that requests find them fresh (see :mod:`sidecar.refreshing`); on PostgreSQL, also
        reload them as soon as another process commits a change (``LISTEN``); and report their
        age (``sidecar_state_age_seconds``)."""
        # Imported here: prometheus_client must not be imported before serve sets its
        # multiprocess directory, and only serving workers report.
        from sidecar import metrics

        for holder in (self.policies, self.keyring):
            report = metrics.state_reporter(holder.name)
            holder.report_loaded_at = report
            report(self.clock() - holder.age())
        self.policies.start()
        self.keyring.start()
        conninfo = listen_conninfo(self.settings.database_url, self.settings.database)
        if conninfo is not None and self.listener is None:
            self.listener = ChangeListener(conninfo, {POLICIES: self.policies, KEYS: self.keyring})
            self.listener.start()

    def close(self) -> None:
        """Graceful shutdown: stop the listener and the timers, write the queued audit events,
        then release the connections. Safe to call twice."""
        if self.listener is not None:
            self.listener.stop()
        self.policies.stop()
        self.keyring.stop()
        self.rate_limiter.close()
        if self.upstreams is not None:
            self.upstreams.close()
        self.audit.close()
        self.engine.dispose()
        if self.policies.report_loaded_at is not None:
            from sidecar import metrics

            metrics.forget_this_process()

    def policy_history_exists(self) -> bool:
        """Whether the policy table ever held a policy (a deletion keeps the history)."""
        with self.engine.connect() as connection:
            return connection.scalar(select(PolicyVersionRow.id).limit(1)) is not None

    def readiness(self) -> dict[str, bool]:
        checks = {"database": True, "signing_key": True, "serving": not self.draining.is_set()}
        try:
            ping(self.engine)
        except Exception:
            checks["database"] = False
        try:
            self.signing_key()
        except Exception:
            checks["signing_key"] = False
        return checks
