"""The database-backed keyring: loading keys, generating the first one, rotating and retiring,
each change made under the ``keyring`` lease so that exactly one process performs it. On
PostgreSQL each change also notifies every worker on commit (:mod:`sidecar.store.notify`), so
that a retired key stops signing everywhere in well under ``keys.refresh_interval``."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from sidecar.config import KeysConfig
from sidecar.keys.encryption import KeyDecryptionError, KeyEncryptor
from sidecar.keys.keyring import Keyring, SigningKey
from sidecar.keys.material import (
    PrivateKey,
    check_key_fits,
    generate_private_key,
    private_key_from_pem,
    private_key_to_pem,
    public_jwk,
)
from sidecar.store.changes import SERVICE, record_key_change
from sidecar.store.db import hold_lease
from sidecar.store.models import SigningKeyRow
from sidecar.store.notify import KEYS, notify_change

log = logging.getLogger(__name__)

__all__ = ["KeyDecryptionError", "KeyStore"]


class KeyStore:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        keys: KeysConfig,
        algorithm: str,
        clock: Callable[[], float],
    ) -> None:
        self._sessions = sessions
        self._config = keys
        self._algorithm = algorithm
        self._clock = clock
        secret = keys.encryption_key.get_secret_value() if keys.encryption_key else None
        self._encryptor = KeyEncryptor(secret) if secret else None
        # Parsed private keys by kid: a refresh re-reads rows but never re-parses a known key.
        self._parsed: dict[str, PrivateKey] = {}

    @property
    def encrypts(self) -> bool:
        return self._encryptor is not None

    def _private_key(self, row: SigningKeyRow) -> PrivateKey:
        cached = self._parsed.get(row.kid)
        if cached is not None:
            return cached
        pem = row.private_key
        if row.encryption is not None:
            if self._encryptor is None:
                raise KeyDecryptionError(
                    f"signing key {row.kid} is encrypted but keys.encryption_key is not set"
                )
            pem = self._encryptor.decrypt(pem, row.kid)
        key = private_key_from_pem(pem)
        check_key_fits(key, row.algorithm)
        self._parsed[row.kid] = key
        return key

    def _to_key(self, row: SigningKeyRow) -> SigningKey:
        return SigningKey(
            kid=row.kid,
            algorithm=row.algorithm,
            private_key=self._private_key(row),
            public_jwk=json.loads(row.public_jwk),
            created_at=row.created_at,
            activates_at=row.activates_at,
            retires_at=row.retires_at,
            removes_at=row.removes_at,
        )

    def load(self) -> Keyring:
        with self._sessions() as session:
            rows = session.scalars(select(SigningKeyRow)).all()
            keyring = Keyring([self._to_key(row) for row in rows])
        known = {k.kid for k in keyring.keys}
        for kid in set(self._parsed) - known:
            del self._parsed[kid]
        return keyring

    def _insert_new_key(self, session: Session, now: float, activates_at: float) -> SigningKeyRow:
        private_key = generate_private_key(self._algorithm)
        jwk = public_jwk(private_key, self._algorithm)
        pem = private_key_to_pem(private_key)
        encryption = None
        if self._encryptor is not None:
            pem = self._encryptor.encrypt(pem, jwk["kid"])
            encryption = self._encryptor.scheme
        row = SigningKeyRow(
            kid=jwk["kid"],
            algorithm=self._algorithm,
            private_key=pem,
            encryption=encryption,
            public_jwk=json.dumps(jwk),
            created_at=now,
            activates_at=activates_at,
        )
        session.add(row)
        self._parsed[row.kid] = private_key
        return row

    def _locked_keyring(self, session: Session) -> Keyring:
        rows = session.scalars(select(SigningKeyRow)).all()
        return Keyring([self._to_key(row) for row in rows])

    def encrypt_stored_keys(self, *, actor: str = SERVICE) -> int:
        """Encrypt every key still stored in clear text (encryption was turned on later)."""
        assert self._encryptor is not None
        with self._sessions() as session, session.begin():
            hold_lease(session, "keyring")
            rows = session.scalars(
                select(SigningKeyRow).where(SigningKeyRow.encryption.is_(None))
            ).all()
            for row in rows:
                row.private_key = self._encryptor.encrypt(row.private_key, row.kid)
                row.encryption = self._encryptor.scheme
                record_key_change(
                    session, at=self._clock(), action="encrypt", kid=row.kid, actor=actor
                )
            if rows:
                notify_change(session, KEYS)
            return len(rows)

    def ensure_current(self, *, actor: str = SERVICE) -> bool:
        """Make sure a key signs now; True if the keyring changed. A published ``next`` key is
        brought forward (verifiers may already have it); otherwise a key is generated."""
        with self._sessions() as session, session.begin():
            hold_lease(session, "keyring")
            now = self._clock()
            keyring = self._locked_keyring(session)
            if keyring.current(now) is not None:
                return False
            pending = keyring.upcoming(now)
            if pending is not None:
                session.execute(
                    update(SigningKeyRow)
                    .where(SigningKeyRow.kid == pending.kid)
                    .values(activates_at=now)
                )
                log.info("signing key kid=%s brought forward", pending.kid)
                record_key_change(session, at=now, action="forward", kid=pending.kid, actor=actor)
                notify_change(session, KEYS)
                return True
            row = self._insert_new_key(session, now, now)
            log.info("generated signing key kid=%s alg=%s", row.kid, row.algorithm)
            record_key_change(session, at=now, action="generate", kid=row.kid, actor=actor)
            notify_change(session, KEYS)
            return True

    def rotate(self, *, immediate: bool = False, actor: str = SERVICE) -> SigningKey:
        """Start a rotation: a new key that signs after ``publish_ahead`` (or at once)."""
        with self._sessions() as session, session.begin():
            hold_lease(session, "keyring")
            now = self._clock()
            keyring = self._locked_keyring(session)
            pending = keyring.upcoming(now)
            if pending is not None and not immediate:
                return pending
            if pending is not None:
                # --now with a key already published: bring that one forward.
                session.execute(
                    update(SigningKeyRow)
                    .where(SigningKeyRow.kid == pending.kid)
                    .values(activates_at=now)
                )
            plan = keyring.plan_rotation(
                now,
                publish_ahead=self._config.publish_ahead,
                retain_after=self._config.retain_after,
                immediate=immediate,
            )
            if plan.retiring_kid is not None:
                session.execute(
                    update(SigningKeyRow)
                    .where(SigningKeyRow.kid == plan.retiring_kid)
                    .values(retires_at=plan.retires_at, removes_at=plan.removes_at)
                )
            if pending is not None:
                kid = pending.kid
            else:
                kid = self._insert_new_key(session, now, plan.activates_at).kid
            record_key_change(session, at=now, action="rotate", kid=kid, actor=actor)
            notify_change(session, KEYS)
            log.info("rotation started: kid=%s activates_at=%.0f", kid, plan.activates_at)
        new_key = self.load().find(kid)
        assert new_key is not None
        return new_key

    def retire(self, kid: str, *, actor: str = SERVICE) -> bool:
        """Stop signing with ``kid`` now (it stays published for ``retain_after``)."""
        with self._sessions() as session, session.begin():
            hold_lease(session, "keyring")
            now = self._clock()
            row = session.get(SigningKeyRow, kid)
            if row is None:
                return False
            row.retires_at = min(row.retires_at or now, now)
            row.removes_at = min(
                row.removes_at or now + self._config.retain_after, now + self._config.retain_after
            )
            record_key_change(session, at=now, action="retire", kid=kid, actor=actor)
            notify_change(session, KEYS)
        return True

    def maintain(self) -> Keyring:
        """Keep the keyring healthy and return it: a current key exists, a rotation starts when
        one is due, and keys past their publication window are deleted."""
        keyring = self.load()
        now = self._clock()
        changed = False
        if keyring.current(now) is None:
            changed = self.ensure_current()
        elif keyring.rotation_due(
            now, rotate_every=self._config.rotate_every, publish_ahead=self._config.publish_ahead
        ):
            self.rotate()
            changed = True
        if any(k.removes_at is not None and k.removes_at <= now for k in keyring.keys):
            with self._sessions() as session, session.begin():
                hold_lease(session, "keyring")
                removed = session.scalars(
                    delete(SigningKeyRow)
                    .where(SigningKeyRow.removes_at <= now)
                    .returning(SigningKeyRow.kid)
                ).all()
                for kid in removed:
                    record_key_change(session, at=now, action="remove", kid=kid)
                notify_change(session, KEYS)
            changed = True
        return self.load() if changed else keyring
