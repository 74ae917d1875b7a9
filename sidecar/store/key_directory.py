"""A keyring read from PEM files in a directory (``keys.directory``): for Kubernetes, where the
private keys are a mounted Secret volume and rotation is done by changing the Secret.

Every valid key file is published. A key file signs once it has been on disk for
``keys.publish_ahead`` (by its modification time), so verifiers see a new key before it signs; of
those, the newest signs. When no file is that old yet (a fresh deployment), the oldest signs at
once, and a key added soon after it still waits its ``publish_ahead``. A file that disappears
leaves the JWKS at the next rescan; an unreadable or unusable file is skipped with a warning.
The directory is rescanned every ``keys.refresh_interval``; a file whose name, size and
modification time are unchanged is not parsed again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sidecar.keys.keyring import Keyring, SigningKey
from sidecar.keys.material import PrivateKey, check_key_fits, private_key_from_pem, public_jwk

log = logging.getLogger(__name__)

KEY_FILE_SUFFIXES = (".pem", ".key")
MAX_KEY_FILE_BYTES = 64 * 1024


class KeyDirectoryError(Exception):
    """The key directory holds no usable key."""


@dataclass(frozen=True, slots=True)
class _KeyFile:
    kid: str
    algorithm: str
    private_key: PrivateKey
    public_jwk: dict[str, object]
    mtime: float


def algorithm_for(key: PrivateKey, preferred: str) -> str:
    """One algorithm per key: EC P-256 -> ES256, Ed25519 -> EdDSA, RSA -> the configured RSA
    algorithm (RS256 or PS256), RS256 if the configured one is not an RSA algorithm."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "ES256"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(key, rsa.RSAPrivateKey):
        return preferred if preferred in ("RS256", "PS256") else "RS256"
    raise ValueError("unsupported key type")


class DirectoryKeyStore:
    """Implements the keyring part of :class:`sidecar.store.keys.KeyStore` over a directory."""

    encrypts = False

    def __init__(
        self,
        directory: Path,
        *,
        preferred_algorithm: str,
        publish_ahead: float,
        clock: Callable[[], float],
    ) -> None:
        self.directory = directory
        self._preferred = preferred_algorithm
        self._publish_ahead = publish_ahead
        self._clock = clock
        self._parsed: dict[tuple[str, int, float], _KeyFile] = {}

    def _read(self, path: Path) -> _KeyFile | None:
        try:
            stat = path.stat()
            cache_key = (path.name, stat.st_size, stat.st_mtime)
            cached = self._parsed.get(cache_key)
            if cached is not None:
                return cached
            if stat.st_size > MAX_KEY_FILE_BYTES:
                raise ValueError("file too large")
            key = private_key_from_pem(path.read_bytes())
            algorithm = algorithm_for(key, self._preferred)
            check_key_fits(key, algorithm)
        except (OSError, ValueError, TypeError) as exc:
            log.warning("key file %s skipped: %s", path.name, type(exc).__name__)
            return None
        jwk = public_jwk(key, algorithm)
        parsed = _KeyFile(str(jwk["kid"]), algorithm, key, jwk, stat.st_mtime)
        self._parsed[cache_key] = parsed
        return parsed

    def _scan(self) -> list[_KeyFile]:
        try:
            paths = sorted(
                p for p in self.directory.iterdir() if p.suffix in KEY_FILE_SUFFIXES and p.is_file()
            )
        except OSError as exc:
            raise KeyDirectoryError(f"cannot read keys.directory {self.directory}") from exc
        files: dict[str, _KeyFile] = {}
        for path in paths:
            parsed = self._read(path)
            if parsed is not None and parsed.kid not in files:
                files[parsed.kid] = parsed
        live = {(f.kid, f.mtime) for f in files.values()}
        self._parsed = {k: v for k, v in self._parsed.items() if (v.kid, v.mtime) in live}
        return sorted(files.values(), key=lambda f: (f.mtime, f.kid))

    def load(self) -> Keyring:
        files = self._scan()
        if not files:
            return Keyring([])
        now = self._clock()
        ready = [f for f in files if f.mtime + self._publish_ahead <= now]
        # None ready: the oldest signs, so that a file added within publish_ahead of the first
        # one does not sign before verifiers can have fetched it.
        signer = ready[-1] if ready else files[0]
        signing_since = min(signer.mtime + (self._publish_ahead if ready else 0.0), now)
        keys = []
        for f in files:
            if f is signer:
                activates_at, retires_at = signing_since, None
            elif (f.mtime, f.kid) > (signer.mtime, signer.kid):
                activates_at, retires_at = f.mtime + self._publish_ahead, None  # next
            else:
                activates_at, retires_at = min(f.mtime, signing_since), signing_since  # previous
            keys.append(
                SigningKey(
                    kid=f.kid,
                    algorithm=f.algorithm,
                    private_key=f.private_key,
                    public_jwk=dict(f.public_jwk),
                    created_at=f.mtime,
                    activates_at=activates_at,
                    retires_at=retires_at,
                )
            )
        return Keyring(keys)

    def maintain(self) -> Keyring:
        return self.load()

    def ensure_current(self, *, actor: str = "sidecar") -> bool:
        if self.load().current(self._clock()) is None:
            raise KeyDirectoryError(f"keys.directory {self.directory} holds no usable private key")
        return False

    def rotate(self, *, immediate: bool = False, actor: str = "sidecar") -> SigningKey:
        raise KeyDirectoryError(
            "keys are files in keys.directory: rotate by adding a key file there"
        )

    def retire(self, kid: str, *, actor: str = "sidecar") -> bool:
        raise KeyDirectoryError("keys are files in keys.directory: retire by removing the file")
