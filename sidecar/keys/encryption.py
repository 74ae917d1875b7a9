"""Encryption of private signing keys at rest: AES-256-GCM (an authenticated cipher) under a key
derived with HKDF-SHA256 from ``keys.encryption_key``. The ``kid`` is bound as associated data,
so a ciphertext moved onto another key's row does not decrypt."""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SCHEME = "A256GCM+HKDF-SHA256"
_NONCE_BYTES = 12
_TAG_BYTES = 16


class KeyDecryptionError(Exception):
    """A stored key cannot be decrypted: the key-encryption key is wrong or the row is corrupt."""


class KeyEncryptor:
    scheme = SCHEME

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("keys.encryption_key must not be empty")
        self._aead = AESGCM(
            HKDF(
                algorithm=hashes.SHA256(),
                length=32,
                salt=b"token-exchange-sidecar/v1",
                info=b"signing-key-encryption",
            ).derive(secret.encode("utf-8"))
        )

    def encrypt(self, plaintext: bytes, kid: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, kid.encode())

    def decrypt(self, blob: bytes, kid: str) -> bytes:
        if len(blob) < _NONCE_BYTES + _TAG_BYTES:
            # AESGCM raises a bare ValueError on a short nonce: report a corrupt row instead.
            raise KeyDecryptionError(f"signing key {kid} cannot be decrypted: the row is corrupt")
        try:
            return self._aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], kid.encode())
        except InvalidTag:
            raise KeyDecryptionError(
                f"signing key {kid} cannot be decrypted: keys.encryption_key is wrong"
            ) from None
