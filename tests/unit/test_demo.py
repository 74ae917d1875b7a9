"""The demo identity provider (sidecar/demo.py): a key pair made once, its public JWKS, and subject
tokens it signs that verify against that JWKS. The ``sidecar demo-init`` / ``demo-token``
commands are tested in tests/functional/test_cli.py."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from sidecar.demo import DEMO_ALGORITHM, demo_token, init_demo_idp
from sidecar.keys.material import private_key_from_pem, public_jwk

ISSUER = "http://127.0.0.1:9000/demo-idp"
AUDIENCE = "https://gateway.demo.example"


@pytest.fixture
def paths(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "keys" / "demo-idp.pem", tmp_path / "keys" / "demo-idp.jwks.json"


@pytest.fixture
def initialised(paths: tuple[Path, Path]) -> tuple[Path, Path]:
    assert init_demo_idp(*paths)
    return paths


def verified(token: str, jwks_path: Path) -> dict[str, Any]:
    [key] = jwt.PyJWKSet.from_dict(json.loads(jwks_path.read_text())).keys
    header = jwt.get_unverified_header(token)
    assert header["kid"] == key.key_id
    return jwt.decode(token, key.key, algorithms=[DEMO_ALGORITHM], audience=AUDIENCE, issuer=ISSUER)


def a_token(private_path: Path, *, ttl: int = 300, extra: dict[str, Any] | None = None) -> str:
    return demo_token(
        private_path,
        issuer=ISSUER,
        audience=AUDIENCE,
        subject="alice@example.com",
        scope="code.read",
        ttl=ttl,
        extra=extra,
    )


# --- the key pair ---------------------------------------------------------------------------------


def test_init_creates_the_key_and_its_directory(paths: tuple[Path, Path]) -> None:
    private_path, jwks_path = paths

    assert init_demo_idp(private_path, jwks_path) is True

    assert private_path.is_file()
    assert jwks_path.is_file()


def test_the_private_key_is_readable_by_its_owner_only(initialised: tuple[Path, Path]) -> None:
    private_path, _ = initialised
    assert stat.S_IMODE(private_path.stat().st_mode) == 0o600


def test_the_jwks_publishes_the_public_half_of_that_key(initialised: tuple[Path, Path]) -> None:
    private_path, jwks_path = initialised
    key = private_key_from_pem(private_path.read_bytes())

    jwks = json.loads(jwks_path.read_text())

    assert jwks == {"keys": [public_jwk(key, DEMO_ALGORITHM)]}
    assert "d" not in jwks["keys"][0]  # no private member
    assert jwks["keys"][0]["alg"] == "ES256"


def test_init_again_keeps_the_existing_key_pair(initialised: tuple[Path, Path]) -> None:
    private_path, jwks_path = initialised
    before = (private_path.read_bytes(), jwks_path.read_bytes())

    assert init_demo_idp(private_path, jwks_path) is False

    assert (private_path.read_bytes(), jwks_path.read_bytes()) == before


# --- the tokens -----------------------------------------------------------------------------------


def test_a_demo_token_verifies_against_the_jwks(initialised: tuple[Path, Path]) -> None:
    private_path, jwks_path = initialised

    claims = verified(a_token(private_path), jwks_path)

    assert (claims["sub"], claims["scope"]) == ("alice@example.com", "code.read")


def test_a_demo_token_lives_for_its_ttl_from_now(initialised: tuple[Path, Path]) -> None:
    private_path, jwks_path = initialised
    before = int(time.time())

    claims = verified(a_token(private_path, ttl=90), jwks_path)

    assert before <= int(claims["iat"]) <= int(time.time())
    assert int(claims["exp"]) - int(claims["iat"]) == 90


def test_a_demo_token_is_an_access_token_jwt(initialised: tuple[Path, Path]) -> None:
    private_path, _ = initialised
    header = jwt.get_unverified_header(a_token(private_path))
    assert (header["typ"], header["alg"]) == ("at+jwt", DEMO_ALGORITHM)


def test_each_demo_token_has_its_own_jti(initialised: tuple[Path, Path]) -> None:
    private_path, jwks_path = initialised
    jtis = {verified(a_token(private_path), jwks_path)["jti"] for _ in range(3)}
    assert len(jtis) == 3


def test_extra_claims_are_added_to_the_token(initialised: tuple[Path, Path]) -> None:
    private_path, jwks_path = initialised

    claims = verified(a_token(private_path, extra={"tenant": "acme", "groups": ["eng"]}), jwks_path)

    assert (claims["tenant"], claims["groups"]) == ("acme", ["eng"])


def test_a_demo_token_needs_the_demo_key(paths: tuple[Path, Path]) -> None:
    private_path, _ = paths
    with pytest.raises(FileNotFoundError):
        a_token(private_path)
