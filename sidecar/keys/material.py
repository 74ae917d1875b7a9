"""Key material: generation, PKCS#8 serialisation and public JWKs (RFC 7517), with ``kid`` the
RFC 7638 thumbprint of the public key.

One algorithm per key, stated in its JWK: ES256 (P-256), EdDSA (Ed25519), RS256 and PS256 (RSA,
3072 bits when generated here; at least 2048 accepted).
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey

RSA_GENERATED_BITS = 3072
RSA_MINIMUM_BITS = 2048
# RFC 7638 §3.2: the required members of each key type, in lexicographic order.
_THUMBPRINT_MEMBERS = {
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
    "RSA": ("e", "kty", "n"),
}


def generate_private_key(algorithm: str) -> PrivateKey:
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm in ("RS256", "PS256"):
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_GENERATED_BITS)
    raise ValueError(f"unsupported signing algorithm {algorithm!r}")


def check_key_fits(key: Any, algorithm: str) -> None:
    """Raise ValueError unless ``key`` is a private key usable with ``algorithm``."""
    if algorithm == "ES256":
        fits = isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    elif algorithm == "EdDSA":
        fits = isinstance(key, ed25519.Ed25519PrivateKey)
    elif algorithm in ("RS256", "PS256"):
        fits = isinstance(key, rsa.RSAPrivateKey) and key.key_size >= RSA_MINIMUM_BITS
    else:
        fits = False
    if not fits:
        raise ValueError(f"the key does not fit algorithm {algorithm}")


def private_key_to_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def private_key_from_pem(pem: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    ):
        raise ValueError("unsupported private key type")
    return key


def _public_jwk_members(key: PrivateKey) -> dict[str, Any]:
    public = key.public_key()
    if isinstance(public, ec.EllipticCurvePublicKey):
        return ECAlgorithm.to_jwk(public, as_dict=True)
    if isinstance(public, ed25519.Ed25519PublicKey):
        return OKPAlgorithm.to_jwk(public, as_dict=True)
    return RSAAlgorithm.to_jwk(public, as_dict=True)


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url without padding)."""
    members = {name: jwk[name] for name in _THUMBPRINT_MEMBERS[jwk["kty"]]}
    digest = hashlib.sha256(
        json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    ).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def public_jwk(key: PrivateKey, algorithm: str) -> dict[str, Any]:
    """The public JWK of ``key`` with ``kid`` (its thumbprint), ``alg`` and ``use: sig``."""
    jwk = {k: v for k, v in _public_jwk_members(key).items() if k not in ("alg", "key_ops")}
    jwk.update(kid=jwk_thumbprint(jwk), alg=algorithm, use="sig")
    return jwk
