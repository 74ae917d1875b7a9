"""The directory keyring (sidecar/store/key_directory.py) on its own: PEM files in a temporary
directory, their age set with ``os.utime`` against a fake clock, keys generated in fixtures. Which
key signs, which is next and which retired follows from each file's modification time and
``publish_ahead``; files that are not usable keys are skipped. Through the app and the CLI:
tests/functional/http/test_key_directory.py."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sidecar.keys.keyring import CURRENT, NEXT, PREVIOUS, Keyring
from sidecar.keys.material import private_key_to_pem, public_jwk
from sidecar.store.key_directory import (
    MAX_KEY_FILE_BYTES,
    DirectoryKeyStore,
    KeyDirectoryError,
    algorithm_for,
)
from tests.conftest import FakeClock

NOW = 1_800_000_000.0
PUBLISH_AHEAD = 600.0


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def other_p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def p384() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@pytest.fixture(scope="module")
def rsa_1024() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    path = tmp_path / "signing-keys"
    path.mkdir()
    return path


@pytest.fixture
def store(directory: Path, clock: FakeClock) -> DirectoryKeyStore:
    return DirectoryKeyStore(
        directory, preferred_algorithm="ES256", publish_ahead=PUBLISH_AHEAD, clock=clock
    )


def write_key(directory: Path, name: str, key: Any, *, age: float) -> str:
    """A PEM key file modified ``age`` seconds before NOW; the key's kid."""
    write_bytes(directory, name, private_key_to_pem(key), age=age)
    algorithm = algorithm_for(key, "ES256")
    return str(public_jwk(key, algorithm)["kid"])


def write_bytes(directory: Path, name: str, data: bytes, *, age: float) -> Path:
    path = directory / name
    path.write_bytes(data)
    os.utime(path, (NOW - age, NOW - age))
    return path


@pytest.fixture
def two_key_files(
    directory: Path, p256: ec.EllipticCurvePrivateKey, other_p256: ec.EllipticCurvePrivateKey
) -> Callable[[float, float], tuple[str, str]]:
    """Writes ``p256`` as old.pem and ``other_p256`` as new.pem, modified these many seconds
    before NOW: their kids."""

    def write(old_age: float, new_age: float) -> tuple[str, str]:
        old = write_key(directory, "old.pem", p256, age=old_age)
        return old, write_key(directory, "new.pem", other_p256, age=new_age)

    return write


def states(keyring: Keyring, now: float) -> dict[str, str]:
    return {key.kid: key.state(now) for key in keyring.keys}


# --- which key signs ------------------------------------------------------------------------------


def test_a_key_file_older_than_publish_ahead_signs(
    store: DirectoryKeyStore, directory: Path, p256: ec.EllipticCurvePrivateKey
) -> None:
    kid = write_key(directory, "a.pem", p256, age=PUBLISH_AHEAD + 60)

    [key] = store.load().keys

    assert (key.kid, key.state(NOW), key.algorithm) == (kid, CURRENT, "ES256")
    assert key.activates_at == NOW - 60  # when it had been on disk for publish_ahead
    assert key.created_at == NOW - PUBLISH_AHEAD - 60


def test_in_a_fresh_deployment_the_only_key_signs_at_once(
    store: DirectoryKeyStore, directory: Path, p256: ec.EllipticCurvePrivateKey
) -> None:
    kid = write_key(directory, "a.pem", p256, age=5)
    current = store.load().current(NOW)
    assert current is not None
    assert current.kid == kid


def test_a_new_key_is_published_at_once_and_signs_after_publish_ahead(
    store: DirectoryKeyStore, clock: FakeClock, two_key_files: Callable[..., tuple[str, str]]
) -> None:
    old, new = two_key_files(3600, 60)

    keyring = store.load()
    assert states(keyring, NOW) == {old: CURRENT, new: NEXT}
    assert [k.kid for k in keyring.published(NOW)] == [old, new]  # verifiers see it now
    nxt = keyring.find(new)
    assert nxt is not None
    assert nxt.activates_at == NOW - 60 + PUBLISH_AHEAD

    clock.advance(PUBLISH_AHEAD - 60)
    assert states(store.load(), clock()) == {old: PREVIOUS, new: CURRENT}


def test_of_several_keys_past_publish_ahead_the_newest_signs(
    store: DirectoryKeyStore, two_key_files: Callable[..., tuple[str, str]]
) -> None:
    older, newer = two_key_files(7200, 3600)

    keyring = store.load()

    assert states(keyring, NOW) == {older: PREVIOUS, newer: CURRENT}
    retired = keyring.find(older)
    assert retired is not None
    assert retired.retires_at == NOW - 3600 + PUBLISH_AHEAD  # when the newer one began signing


def test_a_key_added_soon_after_the_first_still_waits_its_publish_ahead(
    store: DirectoryKeyStore, two_key_files: Callable[..., tuple[str, str]]
) -> None:
    # Neither is past publish_ahead: the oldest signs, so the second cannot sign before
    # verifiers could have fetched it.
    first, second = two_key_files(120, 60)

    assert states(store.load(), NOW) == {first: CURRENT, second: NEXT}


def test_a_removed_key_file_leaves_the_keyring_at_the_next_load(
    store: DirectoryKeyStore, directory: Path, two_key_files: Callable[..., tuple[str, str]]
) -> None:
    _, kept = two_key_files(7200, 3600)
    store.load()

    (directory / "old.pem").unlink()

    assert [key.kid for key in store.load().keys] == [kept]


# --- which files are keys -------------------------------------------------------------------------


def test_a_malformed_file_is_skipped_with_a_warning_naming_only_the_file(
    store: DirectoryKeyStore,
    directory: Path,
    p256: ec.EllipticCurvePrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    kid = write_key(directory, "good.pem", p256, age=3600)
    secret = b"-----BEGIN PRIVATE KEY-----\nnot-base64-secret-material\n-----END PRIVATE KEY-----\n"
    write_bytes(directory, "broken.pem", secret, age=3600)

    with caplog.at_level(logging.WARNING, logger="sidecar.store.key_directory"):
        keyring = store.load()

    assert [key.kid for key in keyring.keys] == [kid]
    assert "key file broken.pem skipped: ValueError" in caplog.text
    assert "secret-material" not in caplog.text


@pytest.mark.parametrize("unusable", ["p384", "rsa_1024"])
def test_a_key_no_algorithm_accepts_is_skipped(
    store: DirectoryKeyStore, directory: Path, unusable: str, request: pytest.FixtureRequest
) -> None:
    write_key(directory, "unusable.pem", request.getfixturevalue(unusable), age=3600)
    assert store.load().keys == ()


def test_a_file_over_the_size_limit_is_skipped_unread(
    store: DirectoryKeyStore, directory: Path, p256: ec.EllipticCurvePrivateKey
) -> None:
    padded = private_key_to_pem(p256) + b"\n" * MAX_KEY_FILE_BYTES
    write_bytes(directory, "big.pem", padded, age=3600)
    assert store.load().keys == ()


def test_only_pem_and_key_files_are_read(
    store: DirectoryKeyStore,
    directory: Path,
    p256: ec.EllipticCurvePrivateKey,
    other_p256: ec.EllipticCurvePrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
) -> None:
    pem = write_key(directory, "a.pem", p256, age=3600)
    key = write_key(directory, "b.key", other_p256, age=3600)
    write_key(directory, "c.txt", ed_key, age=3600)
    (directory / "d.pem").mkdir()  # a directory with a key's name: no file

    assert sorted(k.kid for k in store.load().keys) == sorted([pem, key])


def test_the_same_key_in_two_files_is_one_key(
    store: DirectoryKeyStore, directory: Path, p256: ec.EllipticCurvePrivateKey
) -> None:
    kid = write_key(directory, "a.pem", p256, age=3600)
    write_key(directory, "copy.pem", p256, age=60)
    assert [key.kid for key in store.load().keys] == [kid]


def test_an_unchanged_file_is_not_parsed_again(
    store: DirectoryKeyStore, directory: Path, p256: ec.EllipticCurvePrivateKey
) -> None:
    kid = write_key(directory, "a.pem", p256, age=3600)
    store.load()
    size = (directory / "a.pem").stat().st_size
    # Same name, size and modification time: taken as the same file, not read again.
    write_bytes(directory, "a.pem", b"x" * size, age=3600)

    assert [key.kid for key in store.load().keys] == [kid]


def test_each_key_type_gets_its_algorithm_and_a_thumbprint_kid(
    directory: Path,
    clock: FakeClock,
    p256: ec.EllipticCurvePrivateKey,
    ed_key: ed25519.Ed25519PrivateKey,
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    store = DirectoryKeyStore(
        directory, preferred_algorithm="PS256", publish_ahead=PUBLISH_AHEAD, clock=clock
    )
    for name, key in (("ec.pem", p256), ("ed.pem", ed_key), ("rsa.pem", rsa_key)):
        write_bytes(directory, name, private_key_to_pem(key), age=3600)

    found = {key.algorithm: key for key in store.load().keys}

    assert set(found) == {"ES256", "EdDSA", "PS256"}
    assert found["PS256"].public_jwk == public_jwk(rsa_key, "PS256")
    assert found["EdDSA"].kid == public_jwk(ed_key, "EdDSA")["kid"]


@pytest.mark.parametrize(("preferred", "algorithm"), [("RS256", "RS256"), ("ES256", "RS256")])
def test_an_rsa_key_signs_with_the_configured_rsa_algorithm_or_rs256(
    rsa_key: rsa.RSAPrivateKey, preferred: str, algorithm: str
) -> None:
    assert algorithm_for(rsa_key, preferred) == algorithm


# --- an empty directory and what it cannot do ----------------------------------------------------


def test_an_empty_directory_is_an_empty_keyring(store: DirectoryKeyStore) -> None:
    assert store.load().keys == ()


def test_ensure_current_refuses_a_directory_without_a_usable_key(
    store: DirectoryKeyStore, directory: Path
) -> None:
    write_bytes(directory, "broken.pem", b"not a key", age=3600)
    with pytest.raises(KeyDirectoryError, match="holds no usable private key"):
        store.ensure_current()


def test_ensure_current_with_a_key_changes_nothing(
    store: DirectoryKeyStore, directory: Path, p256: ec.EllipticCurvePrivateKey
) -> None:
    write_key(directory, "a.pem", p256, age=3600)
    assert store.ensure_current() is False
    assert store.maintain().current(NOW) is not None


def test_a_missing_directory_is_an_error_naming_it(tmp_path: Path, clock: FakeClock) -> None:
    missing = tmp_path / "nowhere"
    store = DirectoryKeyStore(
        missing, preferred_algorithm="ES256", publish_ahead=PUBLISH_AHEAD, clock=clock
    )
    with pytest.raises(KeyDirectoryError, match=f"cannot read keys.directory {missing}"):
        store.load()


def test_keys_are_rotated_and_retired_by_changing_the_files(store: DirectoryKeyStore) -> None:
    with pytest.raises(KeyDirectoryError, match="rotate by adding a key file"):
        store.rotate()
    with pytest.raises(KeyDirectoryError, match="retire by removing the file"):
        store.retire("any-kid")
    assert store.encrypts is False
