"""Signing key material: generation, PEM round trip, public JWKs with RFC 7638 kids."""

from __future__ import annotations

from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sidecar.keys.material import (
    PrivateKey,
    check_key_fits,
    generate_private_key,
    jwk_thumbprint,
    private_key_from_pem,
    private_key_to_pem,
    public_jwk,
)

ALGORITHMS = ("ES256", "EdDSA", "RS256", "PS256")
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}

# RFC 7638 §3.1: the example RSA key and its SHA-256 thumbprint.
RFC7638_N = (
    "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
    "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_F"
    "DW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4"
    "vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
)
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.fixture(scope="module")
def keys() -> dict[str, PrivateKey]:
    """One generated key per algorithm (RSA generation is slow: once per module)."""
    return {algorithm: generate_private_key(algorithm) for algorithm in ALGORITHMS}


def test_generated_keys_have_the_expected_type(keys: dict[str, PrivateKey]) -> None:
    es256 = keys["ES256"]
    assert isinstance(es256, ec.EllipticCurvePrivateKey)
    assert isinstance(es256.curve, ec.SECP256R1)
    assert isinstance(keys["EdDSA"], ed25519.Ed25519PrivateKey)
    for algorithm in ("RS256", "PS256"):
        key = keys[algorithm]
        assert isinstance(key, rsa.RSAPrivateKey)
        assert key.key_size == 3072


@pytest.mark.parametrize("algorithm", ["HS256", "none", "ES384", "RS512", ""])
def test_unsupported_algorithms_cannot_be_generated(algorithm: str) -> None:
    with pytest.raises(ValueError, match="unsupported"):
        generate_private_key(algorithm)


def test_rfc7638_example_thumbprint() -> None:
    jwk = {"kty": "RSA", "n": RFC7638_N, "e": "AQAB", "alg": "RS256", "kid": "2011-04-29"}
    assert jwk_thumbprint(jwk) == RFC7638_THUMBPRINT


def test_thumbprint_ignores_optional_members_and_member_order() -> None:
    plain = {"e": "AQAB", "kty": "RSA", "n": RFC7638_N}
    decorated = {"use": "sig", "n": RFC7638_N, "kid": "x", "kty": "RSA", "e": "AQAB"}
    assert jwk_thumbprint(plain) == jwk_thumbprint(decorated) == RFC7638_THUMBPRINT


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_public_jwk_has_kid_alg_use_and_no_private_members(
    keys: dict[str, PrivateKey], algorithm: str
) -> None:
    jwk = public_jwk(keys[algorithm], algorithm)

    assert jwk["alg"] == algorithm
    assert jwk["use"] == "sig"
    assert jwk["kid"] == jwk_thumbprint(jwk)
    assert not PRIVATE_MEMBERS & set(jwk)
    assert "key_ops" not in jwk


@pytest.mark.parametrize(
    ("algorithm", "members"),
    [
        ("ES256", {"kty": "EC", "crv": "P-256"}),
        ("EdDSA", {"kty": "OKP", "crv": "Ed25519"}),
        ("RS256", {"kty": "RSA", "e": "AQAB"}),
        ("PS256", {"kty": "RSA", "e": "AQAB"}),
    ],
)
def test_public_jwk_key_type_members(
    keys: dict[str, PrivateKey], algorithm: str, members: dict[str, Any]
) -> None:
    jwk = public_jwk(keys[algorithm], algorithm)
    assert members.items() <= jwk.items()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_public_jwk_verifies_a_signature_of_its_private_key(
    keys: dict[str, PrivateKey], algorithm: str
) -> None:
    token = jwt.encode({"sub": "x"}, keys[algorithm], algorithm=algorithm)
    public = jwt.PyJWK(public_jwk(keys[algorithm], algorithm))
    assert jwt.decode(token, public, algorithms=[algorithm]) == {"sub": "x"}


def test_different_keys_have_different_kids(keys: dict[str, PrivateKey]) -> None:
    other = generate_private_key("ES256")
    assert public_jwk(other, "ES256")["kid"] != public_jwk(keys["ES256"], "ES256")["kid"]


def test_kid_is_stable_for_the_same_key(keys: dict[str, PrivateKey]) -> None:
    assert public_jwk(keys["ES256"], "ES256")["kid"] == public_jwk(keys["ES256"], "ES256")["kid"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_pem_round_trip_keeps_the_key(keys: dict[str, PrivateKey], algorithm: str) -> None:
    pem = private_key_to_pem(keys[algorithm])

    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    restored = private_key_from_pem(pem)
    assert public_jwk(restored, algorithm) == public_jwk(keys[algorithm], algorithm)


def test_pem_that_is_not_a_private_key_is_refused(keys: dict[str, PrivateKey]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - cryptography's message is not ours to pin
        private_key_from_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_each_generated_key_fits_its_algorithm(keys: dict[str, PrivateKey], algorithm: str) -> None:
    check_key_fits(keys[algorithm], algorithm)


@pytest.mark.parametrize(
    ("key_algorithm", "algorithm"),
    [
        ("ES256", "EdDSA"),
        ("ES256", "RS256"),
        ("EdDSA", "ES256"),
        ("RS256", "ES256"),
        ("PS256", "EdDSA"),
        ("ES256", "HS256"),
    ],
)
def test_a_key_of_another_type_does_not_fit(
    keys: dict[str, PrivateKey], key_algorithm: str, algorithm: str
) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        check_key_fits(keys[key_algorithm], algorithm)


def test_rsa_key_used_for_rs256_fits_ps256_too(keys: dict[str, PrivateKey]) -> None:
    check_key_fits(keys["RS256"], "PS256")


def test_p384_key_does_not_fit_es256() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        check_key_fits(ec.generate_private_key(ec.SECP384R1()), "ES256")


def test_rsa_key_below_2048_bits_does_not_fit() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="does not fit"):
        check_key_fits(small, "RS256")


def test_public_key_does_not_fit(keys: dict[str, PrivateKey]) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        check_key_fits(keys["ES256"].public_key(), "ES256")
