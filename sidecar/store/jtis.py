"""Replay protection for private_key_jwt client assertions (RFC 7523 §3 item 7): a ``jti`` is
accepted once per client, remembered in the database (shared by every worker and replica) until
the assertion expires."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from sidecar.errors import TemporarilyUnavailableError
from sidecar.store.models import ClientAssertionJtiRow

MAX_JTI_CHARS = 255


class JtiStore:
    def __init__(self, sessions: sessionmaker[Session], clock: Callable[[], float]) -> None:
        self._sessions = sessions
        self._clock = clock
        self._purged_at = 0.0

    def remember(self, client_id: str, jti: str, expires_at: float) -> bool:
        """Record ``jti``; False if this client already used it (a replay)."""
        if not jti or len(jti) > MAX_JTI_CHARS:
            return False
        try:
            with self._sessions() as session, session.begin():
                session.add(
                    ClientAssertionJtiRow(client_id=client_id, jti=jti, expires_at=expires_at)
                )
        except IntegrityError:
            return False
        except OperationalError as exc:
            raise TemporarilyUnavailableError(reason="database unavailable (jti store)") from exc
        self._purge_expired()
        return True

    def _purge_expired(self) -> None:
        now = self._clock()
        if now - self._purged_at < 60:
            return
        self._purged_at = now
        with self._sessions() as session, session.begin():
            session.execute(
                delete(ClientAssertionJtiRow).where(ClientAssertionJtiRow.expires_at < now)
            )
