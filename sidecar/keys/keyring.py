"""The keyring: which key signs now, which keys are published, and how keys rotate.

A key's state follows from its timestamps, so every worker that reads the same rows agrees:

- ``next``: published in the JWKS, not yet signing (``now < activates_at``);
- ``current``: the one key that signs (``activates_at <= now < retires_at``);
- ``previous``: still published so tokens it signed keep verifying
  (``retires_at <= now < removes_at``);
- ``gone``: no longer published (``removes_at <= now``), deleted by maintenance.

A rotation creates a ``next`` key that activates ``publish_ahead`` later and sets the current
key's ``retires_at`` to that moment and its ``removes_at`` ``retain_after`` after it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from jwt.algorithms import get_default_algorithms
from jwt.utils import base64url_encode

from sidecar.keys.material import PrivateKey

NEXT, CURRENT, PREVIOUS, GONE = "next", "current", "previous", "gone"


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    algorithm: str
    private_key: PrivateKey = field(repr=False)
    public_jwk: dict[str, Any]
    created_at: float
    activates_at: float
    retires_at: float | None = None
    removes_at: float | None = None

    def state(self, now: float) -> str:
        if self.removes_at is not None and now >= self.removes_at:
            return GONE
        if self.retires_at is not None and now >= self.retires_at:
            return PREVIOUS
        if now < self.activates_at:
            return NEXT
        return CURRENT


@dataclass(frozen=True, slots=True)
class RotationPlan:
    """What a rotation changes: the new key's activation and the old key's retirement."""

    activates_at: float
    retiring_kid: str | None
    retires_at: float | None
    removes_at: float | None


class Keyring:
    """An immutable snapshot of every stored key."""

    def __init__(self, keys: Sequence[SigningKey]) -> None:
        self.keys = tuple(sorted(keys, key=lambda k: (k.activates_at, k.created_at, k.kid)))

    def find(self, kid: str) -> SigningKey | None:
        return next((k for k in self.keys if k.kid == kid), None)

    def current(self, now: float) -> SigningKey | None:
        """The signing key: of the keys in state current, the one that activated last."""
        active = [k for k in self.keys if k.state(now) == CURRENT]
        return active[-1] if active else None

    def upcoming(self, now: float) -> SigningKey | None:
        pending = [k for k in self.keys if k.state(now) == NEXT]
        return pending[0] if pending else None

    def published(self, now: float) -> list[SigningKey]:
        return [k for k in self.keys if k.state(now) != GONE]

    def jwks(self, now: float) -> dict[str, Any]:
        return {"keys": [k.public_jwk for k in self.published(now)]}

    def rotation_due(self, now: float, *, rotate_every: float, publish_ahead: float) -> bool:
        """True when the current key is old enough that its successor must be published now."""
        current = self.current(now)
        if current is None or self.upcoming(now) is not None:
            return False
        return now >= current.activates_at + rotate_every - publish_ahead

    def plan_rotation(
        self, now: float, *, publish_ahead: float, retain_after: float, immediate: bool = False
    ) -> RotationPlan:
        activates_at = now if immediate else now + publish_ahead
        current = self.current(now)
        if current is None:
            return RotationPlan(now, None, None, None)
        return RotationPlan(
            activates_at=activates_at,
            retiring_kid=current.kid,
            retires_at=activates_at,
            removes_at=activates_at + retain_after,
        )


class TokenSigner:
    """Signs minted tokens with a key of the keyring: RFC 9068 §2.1 header ``typ: at+jwt``.

    The JWS header segment of each key is encoded once, not per token; the signature is PyJWT's
    algorithm for the key (ES256 signatures in the JWS raw ``r || s`` form)."""

    TYP = "at+jwt"

    def __init__(self) -> None:
        self._prepared: dict[tuple[str, str], tuple[bytes, Any]] = {}

    def _prepare(self, key: SigningKey) -> tuple[bytes, Any]:
        prepared = self._prepared.get((key.kid, key.algorithm))
        if prepared is None:
            header = {"alg": key.algorithm, "kid": key.kid, "typ": self.TYP}
            segment = base64url_encode(json.dumps(header, separators=(",", ":")).encode())
            prepared = (segment, get_default_algorithms()[key.algorithm])
            if len(self._prepared) > 64:  # keys come and go with rotation: keep a few
                self._prepared.clear()
            self._prepared[(key.kid, key.algorithm)] = prepared
        return prepared

    def sign(self, claims: dict[str, Any], key: SigningKey) -> str:
        header_segment, algorithm = self._prepare(key)
        payload = base64url_encode(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = header_segment + b"." + payload
        signature = base64url_encode(algorithm.sign(signing_input, key.private_key))
        return (signing_input + b"." + signature).decode("ascii")
