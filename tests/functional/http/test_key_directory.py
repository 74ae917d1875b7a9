"""The directory keyring (``keys.directory``, sidecar/store/key_directory.py), through the real app:
PEM private keys in a directory (a mounted Secret in Kubernetes) are published, the newest one that
has been on disk for ``publish_ahead`` signs, and changes on disk are picked up without a restart.

A key file's age is its modification time, set here with ``os.utime`` on the service's fake clock.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sidecar.cli import main
from sidecar.config import ConfigError, Settings, settings_from_mapping
from sidecar.keys.keyring import CURRENT, NEXT, PREVIOUS
from sidecar.services import Services
from sidecar.store.key_directory import DirectoryKeyStore, KeyDirectoryError
from sidecar.web.app import create_app
from tests.conftest import CODE_SEARCH, HOURLY_KEYS, SIDECAR_ISSUER, FakeClock, LiveServer, TestIdP

PUBLISH_AHEAD = 600.0
REFRESH = 1.0
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


@pytest.fixture(scope="module")
def rsa_2048() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def thumbprint(key: PrivateKey) -> str:
    """RFC 7638 §3: SHA-256 over the required public members, in lexicographic order, no spaces
    (computed here independently of sidecar.keys.material)."""
    public = key.public_key()

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    def uint(n: int) -> str:
        return b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))

    if isinstance(public, ec.EllipticCurvePublicKey):
        numbers = public.public_numbers()
        size = (public.curve.key_size + 7) // 8
        members = {
            "crv": f"P-{public.curve.key_size}",
            "kty": "EC",
            "x": b64(numbers.x.to_bytes(size, "big")),
            "y": b64(numbers.y.to_bytes(size, "big")),
        }
    elif isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        members = {"crv": "Ed25519", "kty": "OKP", "x": b64(raw)}
    else:
        assert isinstance(public, rsa.RSAPublicKey)
        rsa_numbers = public.public_numbers()
        members = {"e": uint(rsa_numbers.e), "kty": "RSA", "n": uint(rsa_numbers.n)}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return b64(hashlib.sha256(canonical).digest())


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "signing-keys"
    directory.mkdir()
    return directory


def write_key(directory: Path, name: str, data: bytes | Any, mtime: float) -> str | None:
    """Write a key file (a private key, or raw bytes) modified at ``mtime``; its kid, if a key."""
    path = directory / name
    path.write_bytes(data if isinstance(data, bytes) else pem(data))
    os.utime(path, (mtime, mtime))
    return None if isinstance(data, bytes) else thumbprint(data)


@pytest.fixture
def config(config: dict[str, Any], key_dir: Path) -> dict[str, Any]:
    config["keys"] = {**HOURLY_KEYS, "directory": str(key_dir)}
    return config


class Service:
    """The service over a key directory, started on demand (after the test wrote its files)."""

    def __init__(self, settings: Settings, clock: FakeClock) -> None:
        self.services = Services(settings, clock=clock)
        self.server: LiveServer | None = None
        self.services.prepare()
        self.server = LiveServer(create_app(settings, self.services))

    def jwks(self) -> list[dict[str, Any]]:
        assert self.server is not None
        response = requests.get(f"{self.server.url}/.well-known/jwks.json", timeout=10)
        assert response.status_code == 200
        keys: list[dict[str, Any]] = response.json()["keys"]
        return keys

    def published(self) -> set[str]:
        return {jwk["kid"] for jwk in self.jwks()}

    def mint(self, idp: TestIdP) -> str:
        assert self.server is not None
        # Valid by the real time (PyJWT) and by the service clock (the minted lifetime).
        subject_token = idp.token(exp=int(max(self.services.clock(), time.time())) + 600)
        response = self.server.exchange(subject_token)
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return token

    def signing_kid(self, idp: TestIdP) -> str:
        kid: str = jwt.get_unverified_header(self.mint(idp))["kid"]
        return kid

    def states(self) -> dict[str, str]:
        now = self.services.clock()
        return {key.kid: key.state(now) for key in self.services.keys.load().keys}

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.services.engine.dispose()


@pytest.fixture
def start(settings: Settings, clock: FakeClock) -> Iterator[Callable[[], Service]]:
    started: list[Service] = []

    def start() -> Service:
        started.append(Service(settings, clock))
        return started[-1]

    yield start
    for service in started:
        service.stop()


def test_one_key_file_signs_and_is_published(
    start: Callable[[], Service], key_dir: Path, clock: FakeClock, idp: TestIdP
) -> None:
    kid = write_key(key_dir, "signing.pem", p256(), clock.now - 3600)

    service = start()

    assert service.published() == {kid}
    assert service.signing_kid(idp) == kid
    assert isinstance(service.services.keys, DirectoryKeyStore)


def test_a_new_key_file_is_published_at_once_and_signs_after_publish_ahead(
    start: Callable[[], Service], key_dir: Path, clock: FakeClock, idp: TestIdP
) -> None:
    old = write_key(key_dir, "a.pem", p256(), clock.now - 3600)
    service = start()
    assert service.published() == {old}

    added_at = clock.now
    new = write_key(key_dir, "b.pem", p256(), added_at)
    clock.advance(REFRESH)  # the next rescan

    assert service.published() == {old, new}
    assert service.signing_kid(idp) == old
    assert service.states() == {old: CURRENT, new: NEXT}

    clock.now = added_at + PUBLISH_AHEAD - 1
    assert service.signing_kid(idp) == old

    clock.now = added_at + PUBLISH_AHEAD
    assert service.signing_kid(idp) == new
    assert service.published() == {old, new}  # the old key still verifies its tokens
    assert service.states() == {old: PREVIOUS, new: CURRENT}


def test_a_key_added_soon_after_the_first_one_still_waits_publish_ahead(
    start: Callable[[], Service], key_dir: Path, clock: FakeClock, idp: TestIdP
) -> None:
    # A fresh deployment: no file has been on disk publish_ahead, the only one signs at once.
    first = write_key(key_dir, "a.pem", p256(), clock.now)
    service = start()
    assert service.signing_kid(idp) == first

    clock.advance(60)
    second = write_key(key_dir, "b.pem", p256(), clock.now)
    clock.advance(REFRESH)

    assert service.published() == {first, second}
    assert service.signing_kid(idp) == first  # verifiers may not have the second key yet
    clock.now = clock.now - REFRESH + PUBLISH_AHEAD
    assert service.signing_kid(idp) == second


def test_a_removed_key_file_leaves_the_jwks_at_the_next_rescan(
    start: Callable[[], Service], key_dir: Path, clock: FakeClock, idp: TestIdP
) -> None:
    old = write_key(key_dir, "a.pem", p256(), clock.now - 7200)
    new = write_key(key_dir, "b.pem", p256(), clock.now - 3600)
    service = start()
    assert service.published() == {old, new}
    assert service.signing_kid(idp) == new

    (key_dir / "a.pem").unlink()
    clock.advance(REFRESH / 2)
    assert service.published() == {old, new}  # not rescanned yet

    clock.advance(REFRESH / 2)
    assert service.published() == {new}
    assert service.signing_kid(idp) == new


def test_removing_the_signing_key_file_hands_signing_to_the_newest_remaining(
    start: Callable[[], Service], key_dir: Path, clock: FakeClock, idp: TestIdP
) -> None:
    old = write_key(key_dir, "a.pem", p256(), clock.now - 7200)
    write_key(key_dir, "b.pem", p256(), clock.now - 3600)
    service = start()

    (key_dir / "b.pem").unlink()
    clock.advance(REFRESH)

    assert service.published() == {old}
    assert service.signing_kid(idp) == old


def test_unusable_key_files_are_skipped(
    start: Callable[[], Service],
    key_dir: Path,
    clock: FakeClock,
    idp: TestIdP,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    good = write_key(key_dir, "good.pem", p256(), clock.now - 3600)
    garbage = b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"
    write_key(key_dir, "garbage.pem", garbage, clock.now)
    write_key(key_dir, "rsa-1024.pem", rsa.generate_private_key(65537, 1024), clock.now)
    write_key(key_dir, "p384.pem", ec.generate_private_key(ec.SECP384R1()), clock.now)
    write_key(key_dir, "README.txt", b"not a key file name", clock.now)

    service = start()

    assert service.published() == {good}
    assert service.signing_kid(idp) == good
    skipped = {r.getMessage() for r in captured_logs.records if r.levelno == logging.WARNING}
    for name in ("garbage.pem", "rsa-1024.pem", "p384.pem"):
        assert any(name in message for message in skipped), (name, skipped)
    assert not any("README.txt" in message for message in skipped)
    assert not any("bm90IGEga2V5" in message for message in skipped)  # no file content

    # A bad file appearing later does not disturb the running service either.
    write_key(key_dir, "late.pem", b"garbage", clock.now)
    clock.advance(REFRESH)
    assert service.published() == {good}
    assert service.signing_kid(idp) == good


@pytest.mark.parametrize(
    "content",
    [None, b"garbage", "rsa-1024"],
    ids=["empty", "only-garbage", "only-rsa-1024"],
)
def test_a_directory_without_a_usable_key_is_a_start_up_error(
    settings: Settings, key_dir: Path, clock: FakeClock, content: bytes | str | None
) -> None:
    if content == "rsa-1024":
        write_key(key_dir, "weak.pem", rsa.generate_private_key(65537, 1024), clock.now)
    elif isinstance(content, bytes):
        write_key(key_dir, "bad.pem", content, clock.now)
    services = Services(settings, clock=clock)
    try:
        with pytest.raises(KeyDirectoryError) as error:
            services.prepare()
    finally:
        services.engine.dispose()

    assert str(key_dir) in str(error.value)
    assert "no usable private key" in str(error.value)


ROTATE_REASON = "keys are files in keys.directory: rotate by adding a key file there"
RETIRE_REASON = "keys are files in keys.directory: retire by removing the file"


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (["keys", "rotate"], ROTATE_REASON),
        (["keys", "rotate", "--now"], ROTATE_REASON),
        # "--": a kid is base64url and may start with "-", which click would take for an option.
        (["keys", "retire", "--", "KID"], RETIRE_REASON),
    ],
    ids=["rotate", "rotate --now", "retire"],
)
def test_keys_rotate_and_retire_refuse_a_directory_keyring_in_one_line(
    start: Callable[[], Service],
    key_dir: Path,
    clock: FakeClock,
    config_file: Path,
    command: list[str],
    reason: str,
) -> None:
    kid = write_key(key_dir, "a.pem", p256(), clock.now - 3600)
    assert kid is not None
    start().stop()  # migrates the database, as `sidecar serve` would
    command = [kid if arg == "KID" else arg for arg in command]

    result = CliRunner().invoke(main, ["--config", str(config_file), *command])

    assert result.exit_code == 1
    assert result.stdout == ""
    # One line: the reason, and no warning about a rotation that did not happen.
    assert result.stderr.splitlines() == [f"sidecar: error: {reason}"]
    assert sorted(os.listdir(key_dir)) == ["a.pem"]  # nothing written, nothing removed


def test_keys_list_shows_the_directory_keys(
    start: Callable[[], Service],
    key_dir: Path,
    clock: FakeClock,
    config_file: Path,
) -> None:
    old = write_key(key_dir, "a.pem", p256(), clock.now - 7200)
    new = write_key(key_dir, "b.pem", ed25519.Ed25519PrivateKey.generate(), clock.now - 3600)
    start().stop()

    listed = CliRunner().invoke(main, ["--config", str(config_file), "keys", "list", "--json"])

    assert listed.exit_code == 0, listed.output
    rows = {row["kid"]: (row["algorithm"], row["state"]) for row in json.loads(listed.stdout)}
    assert rows == {old: ("ES256", "previous"), new: ("EdDSA", "current")}


def test_a_directory_keyring_cannot_have_an_encryption_key(
    config: dict[str, Any],
) -> None:
    config["keys"]["encryption_key"] = "correct horse battery staple"

    with pytest.raises(ConfigError) as error:
        settings_from_mapping(config, env={})

    message = str(error.value)
    assert message.startswith("keys: ")
    assert "encryption_key" in message
    assert "directory" in message
    assert "correct horse" not in message


@pytest.mark.parametrize(
    ("key_type", "configured", "expected"),
    [
        ("P-256", "ES256", "ES256"),
        ("Ed25519", "ES256", "EdDSA"),
        ("RSA", "RS256", "RS256"),
        ("RSA", "PS256", "PS256"),
        ("RSA", "ES256", "RS256"),
    ],
)
def test_each_key_type_is_published_and_signs_with_its_algorithm(
    config: dict[str, Any],
    key_dir: Path,
    clock: FakeClock,
    idp: TestIdP,
    rsa_2048: rsa.RSAPrivateKey,
    key_type: str,
    configured: str,
    expected: str,
) -> None:
    key: PrivateKey
    if key_type == "P-256":
        key = p256()
    elif key_type == "Ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa_2048
    kid = write_key(key_dir, "signing.pem", key, clock.now - 3600)
    config["tokens"]["algorithm"] = configured
    service = Service(settings_from_mapping(config, env={}), clock)
    try:
        [jwk] = service.jwks()
        token = service.mint(idp)
    finally:
        service.stop()

    assert jwk["kid"] == kid
    assert jwk["alg"] == expected
    assert jwk["use"] == "sig"
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(jwk)
    header = jwt.get_unverified_header(token)
    assert (header["alg"], header["kid"], header["typ"]) == (expected, kid, "at+jwt")
    claims = jwt.decode(
        token,
        jwt.PyJWK(jwk),
        algorithms=[expected],
        audience=CODE_SEARCH,
        issuer=SIDECAR_ISSUER,
        options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]},
    )
    assert claims["sub"] == "alice@example.com"
