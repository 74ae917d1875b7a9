"""Encryption of private signing keys at rest (AES-256-GCM under an HKDF-derived key)."""

from __future__ import annotations

import pytest

from sidecar.keys.encryption import KeyDecryptionError, KeyEncryptor

SECRET = "key-encryption-" + "s" * 24
PLAINTEXT = b"-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG...\n-----END PRIVATE KEY-----\n"


def test_round_trip() -> None:
    encryptor = KeyEncryptor(SECRET)
    assert encryptor.decrypt(encryptor.encrypt(PLAINTEXT, "kid-1"), "kid-1") == PLAINTEXT


def test_another_instance_with_the_same_secret_decrypts() -> None:
    blob = KeyEncryptor(SECRET).encrypt(PLAINTEXT, "kid-1")
    assert KeyEncryptor(SECRET).decrypt(blob, "kid-1") == PLAINTEXT


def test_ciphertext_does_not_contain_the_plaintext() -> None:
    blob = KeyEncryptor(SECRET).encrypt(PLAINTEXT, "kid-1")
    assert b"PRIVATE KEY" not in blob
    assert PLAINTEXT not in blob


def test_each_encryption_uses_a_fresh_nonce() -> None:
    encryptor = KeyEncryptor(SECRET)
    first = encryptor.encrypt(PLAINTEXT, "kid-1")
    second = encryptor.encrypt(PLAINTEXT, "kid-1")
    assert first != second
    assert first[:12] != second[:12]


def test_wrong_secret_is_a_key_decryption_error_without_the_secret() -> None:
    blob = KeyEncryptor(SECRET).encrypt(PLAINTEXT, "kid-1")
    wrong = "another-secret-" + "t" * 24

    with pytest.raises(KeyDecryptionError) as caught:
        KeyEncryptor(wrong).decrypt(blob, "kid-1")
    assert "kid-1" in str(caught.value)
    assert wrong not in str(caught.value)
    assert SECRET not in str(caught.value)


def test_kid_is_bound_as_associated_data() -> None:
    # A ciphertext moved onto another key's row does not decrypt.
    encryptor = KeyEncryptor(SECRET)
    blob = encryptor.encrypt(PLAINTEXT, "kid-1")
    with pytest.raises(KeyDecryptionError):
        encryptor.decrypt(blob, "kid-2")


@pytest.mark.parametrize("position", [0, 12, -1])
def test_tampered_ciphertext_is_refused(position: int) -> None:
    encryptor = KeyEncryptor(SECRET)
    blob = bytearray(encryptor.encrypt(PLAINTEXT, "kid-1"))
    blob[position] ^= 0x01
    with pytest.raises(KeyDecryptionError):
        encryptor.decrypt(bytes(blob), "kid-1")


@pytest.mark.parametrize("blob", [b"", b"short", b"\x00" * 12, b"\x00" * 27])
def test_truncated_ciphertext_is_refused(blob: bytes) -> None:
    with pytest.raises(KeyDecryptionError):
        KeyEncryptor(SECRET).decrypt(blob, "kid-1")


def test_an_empty_secret_is_refused() -> None:
    # Short secrets are a configuration warning (Settings.weaknesses); an empty one never works.
    with pytest.raises(ValueError, match="must not be empty"):
        KeyEncryptor("")
