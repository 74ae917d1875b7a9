"""Private signing keys at rest, at the service's start-up (issue 4): encryption turned on later
encrypts the keys already stored, the service says once and loudly when it stores keys in clear,
and a wrong key-encryption key stops ``sidecar serve`` before any worker starts.

(Encryption of new keys, the round trip and a wrong key on load are in
tests/unit/store/test_keys.py; `keys list` / `keys rotate` with a wrong key in tests/test_cli.py.)
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from sqlalchemy import Engine, select

from sidecar.config import Settings, settings_from_mapping
from sidecar.keys.encryption import SCHEME
from sidecar.services import Services
from sidecar.store.db import make_engine
from sidecar.store.models import SigningKeyRow
from sidecar.web.app import create_app
from tests.conftest import CODE_SEARCH, SIDECAR_ISSUER, LiveServer, TestIdP, make_services

ENCRYPTION_KEY = "correct horse battery staple"
WRONG_KEY = "not the key-encryption key"
UNENCRYPTED_WARNING = "SIGNING KEYS ARE STORED UNENCRYPTED"
_SCRIPT = Path(sys.executable).parent / "sidecar"
SIDECAR = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "sidecar"]


def with_encryption_key(config: dict[str, Any], key: str | None) -> Settings:
    keys = {**config["keys"], **({"encryption_key": key} if key else {})}
    return settings_from_mapping({**config, "keys": keys}, env={})


def raw_rows(engine: Engine) -> list[tuple[str, bytes, str | None]]:
    """The stored rows as the database holds them."""
    with engine.connect() as connection:
        rows = connection.execute(
            select(SigningKeyRow.kid, SigningKeyRow.private_key, SigningKeyRow.encryption)
        )
        return [(kid, bytes(private_key), encryption) for kid, private_key, encryption in rows]


def mint_and_verify(services: Services, idp: TestIdP) -> str:
    """Mint a token over HTTP and verify it as an upstream does; its kid."""
    server = LiveServer(create_app(services.settings, services))
    try:
        response = server.exchange(idp.token())
        assert response.status_code == 200, response.text
        token = response.json()["access_token"]
        jwks = jwt.PyJWKClient(f"{server.url}/.well-known/jwks.json", cache_jwk_set=False)
        jwt.decode(
            token,
            jwks.get_signing_key_from_jwt(token),
            algorithms=["ES256"],
            audience=CODE_SEARCH,
            issuer=SIDECAR_ISSUER,
            options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]},
        )
    finally:
        server.stop()
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    kid: str = jwt.get_unverified_header(token)["kid"]
    return kid


def test_turning_encryption_on_encrypts_the_stored_keys_at_start_up(
    config: dict[str, Any], database_url: str, idp: TestIdP
) -> None:
    config["database_url"] = database_url
    clear = make_services(with_encryption_key(config, None))
    try:
        kid = mint_and_verify(clear, idp)
        [(stored_kid, pem, encryption)] = raw_rows(clear.engine)
        assert (stored_kid, encryption) == (kid, None)
        assert b"PRIVATE KEY" in pem
    finally:
        clear.engine.dispose()

    encrypted = make_services(with_encryption_key(config, ENCRYPTION_KEY))
    try:
        [(stored_kid, blob, encryption)] = raw_rows(encrypted.engine)
        assert (stored_kid, encryption) == (kid, SCHEME)
        assert b"PRIVATE KEY" not in blob
        assert pem not in blob
        # The same key, decrypted, still signs.
        assert mint_and_verify(encrypted, idp) == kid
    finally:
        encrypted.engine.dispose()

    # A later start (another replica) leaves the encrypted row as it is and decrypts it.
    restarted = make_services(with_encryption_key(config, ENCRYPTION_KEY))
    try:
        assert raw_rows(restarted.engine) == [(kid, blob, SCHEME)]
        assert mint_and_verify(restarted, idp) == kid
    finally:
        restarted.engine.dispose()


def unencrypted_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if UNENCRYPTED_WARNING in r.getMessage()]


def test_keys_stored_in_clear_are_announced_once_at_start_up(
    settings: Settings, idp: TestIdP, captured_logs: pytest.LogCaptureFixture
) -> None:
    services = make_services(settings)
    try:
        [warning] = unencrypted_warnings(captured_logs)
        assert warning.levelno >= logging.WARNING
        assert "keys.encryption_key" in warning.getMessage()

        # Serving, re-reading and rotating the keyring says nothing more.
        mint_and_verify(services, idp)
        services.keys.rotate()
        services.keyring.refresh()
        assert len(unencrypted_warnings(captured_logs)) == 1
    finally:
        services.engine.dispose()


def test_encrypted_keys_are_not_announced_as_clear(
    config: dict[str, Any], captured_logs: pytest.LogCaptureFixture
) -> None:
    services = make_services(with_encryption_key(config, ENCRYPTION_KEY))
    services.engine.dispose()

    assert unencrypted_warnings(captured_logs) == []


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_a_wrong_key_encryption_key_stops_serve_before_any_worker_starts(
    config: dict[str, Any], tmp_path: Path
) -> None:
    started = make_services(with_encryption_key(config, ENCRYPTION_KEY))
    [(kid, blob, _)] = raw_rows(started.engine)
    started.engine.dispose()
    config_file = tmp_path / "wrong.yaml"
    config_file.write_text(
        yaml.safe_dump({**config, "keys": {**config["keys"], "encryption_key": WRONG_KEY}})
    )
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if k != "SIDECAR_CONFIG"}

    result = subprocess.run(
        [*SIDECAR, "--config", str(config_file), "serve", "--bind", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,  # a server that started would never return: the test fails on the timeout
    )

    assert result.returncode == 1
    assert result.stdout == ""
    # One line, before gunicorn logs anything (booting a worker, listening).
    assert result.stderr.splitlines() == [
        f"sidecar: error: signing key {kid} cannot be decrypted: keys.encryption_key is wrong"
    ]
    assert WRONG_KEY not in result.stderr
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing listens
    # The stored key is untouched (not re-encrypted, not replaced).
    engine = make_engine(config["database_url"])
    try:
        assert raw_rows(engine) == [(kid, blob, SCHEME)]
    finally:
        engine.dispose()
