"""Verification of subject and actor tokens (RFC 8693 §2.1,
https://www.rfc-editor.org/rfc/rfc8693#section-2.1; RFC 7519 §7.2 and RFC 9068 §4).

The gateway has already validated the user's token; we validate it again (defence in depth), and
every check is spelled out here rather than left to a library default:

- the token is a JWS compact serialization (three segments; a JWE is refused);
- ``iss`` names a configured trusted issuer, compared byte for byte;
- the key is looked up by (issuer, ``kid``) in that issuer's JWKS only;
- ``alg`` is in that issuer's allowlist and fits the key; ``none`` and HMAC never are;
- ``jku``, ``x5u``, ``jwk`` and ``x5c`` are never followed: a token carrying them is refused,
  as is one with ``crit`` (we understand no extension) or ``b64``;
- ``exp`` is required; ``nbf`` and ``iat`` are checked; all with the configured leeway;
- ``aud`` contains one of the audiences the issuer entry accepts (the gateway's identifier);
- ``sub`` is a non-empty string; ID tokens are refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from sidecar.errors import InvalidRequestError
from sidecar.exchange import jws

# Header parameters that point at or embed key material, or change how the token is processed.
# RFC 8725 §3.10 warns against following them; we refuse the token instead of ignoring them.
FORBIDDEN_HEADER_PARAMETERS = ("jku", "x5u", "jwk", "x5c", "crit", "b64")
ACCEPTED_TYP = frozenset({"jwt", "at+jwt", "application/at+jwt"})
# Claims that only an OpenID Connect ID token carries.
ID_TOKEN_CLAIMS = ("nonce", "at_hash", "c_hash", "s_hash")
MAX_KID_CHARS = 256


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key of a trusted issuer, parsed once when its JWKS is loaded."""

    kid: str
    key: Any  # a cryptography public key object
    algorithms: frozenset[str]  # what this key may verify: its JWK `alg`, or its family's


class IssuerKeys(Protocol):
    """What verification needs of one trusted issuer."""

    @property
    def issuer(self) -> str: ...

    @property
    def audiences(self) -> tuple[str, ...]: ...

    @property
    def algorithms(self) -> frozenset[str]: ...

    def find_key(self, kid: str) -> VerificationKey | None: ...


class IssuerDirectory(Protocol):
    def find_issuer(self, issuer: str) -> IssuerKeys | None: ...


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    issuer: str
    subject: str
    claims: Mapping[str, Any] = field(repr=False)
    scopes: frozenset[str]
    expires_at: int
    fingerprint: str  # a short SHA-256 prefix that identifies the token in logs and audit


def token_fingerprint(token: str) -> str:
    """Identifies a token in logs and the audit trail without revealing it."""
    return token_digest(token).hex()[:16]


def _refuse(reason: str) -> InvalidRequestError:
    return InvalidRequestError("The token is invalid.", reason=reason)


def scopes_of(claims: Mapping[str, Any]) -> frozenset[str]:
    # RFC 9068 §2.2.3 / RFC 8693 §4.2: "scope" is a space-separated string; some IdPs send "scp"
    # as a list instead.
    scope = claims.get("scope")
    if isinstance(scope, str):
        return frozenset(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, list) and all(isinstance(item, str) for item in scp):
        return frozenset(scp)
    if isinstance(scp, str):
        return frozenset(scp.split())
    return frozenset()


def _check_header(unverified_header: Mapping[str, Any]) -> tuple[str, str]:
    for name in FORBIDDEN_HEADER_PARAMETERS:
        if name in unverified_header:
            raise _refuse(f"header parameter {name} is not accepted")
    alg = unverified_header.get("alg")
    if not isinstance(alg, str):
        raise _refuse("alg header missing")
    typ = unverified_header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.lower() not in ACCEPTED_TYP):
        raise _refuse("typ header not accepted")
    kid = unverified_header.get("kid")
    # Keys are found by (issuer, kid) only; a token without a kid is refused rather than tried
    # against every key of the issuer.
    if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_CHARS:
        raise _refuse("kid header missing or malformed")
    return alg, kid


def _is_numeric_date(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond the range of a binary64 number
        return False


def token_digest(token: str) -> bytes:
    """The SHA-256 of a token: the key of the token caches; its hex prefix is the fingerprint."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _unverified_segment(segment: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def verify_token(
    token: str, issuers: IssuerDirectory, *, leeway: int, role: str = "subject"
) -> VerifiedToken:
    """Verify a subject or actor token, returning its verified claims, or raise
    :class:`InvalidRequestError` (RFC 8693 §2.2.2: an invalid token is ``invalid_request``)."""
    return verify_token_and_key(token, issuers, leeway=leeway, role=role)[0]


def verify_token_and_key(
    token: str,
    issuers: IssuerDirectory,
    *,
    leeway: int,
    role: str = "subject",
    digest: bytes | None = None,
) -> tuple[VerifiedToken, VerificationKey]:
    """:func:`verify_token`, also returning the issuer key that verified the token."""
    if token.count(".") != 2:
        raise _refuse(f"{role} token is not a JWS compact serialization")
    header_segment, payload_segment, _ = token.split(".")
    try:
        # Read only to find the issuer and key whose rules apply; jws.decode below verifies.
        unverified_header = _unverified_segment(header_segment)
        unverified_claims = _unverified_segment(payload_segment)
    except Exception as exc:  # any failure to parse hostile input is a refusal
        raise _refuse(f"{role} token is malformed") from exc
    if not isinstance(unverified_header, dict) or not isinstance(unverified_claims, dict):
        raise _refuse(f"{role} token is malformed")

    alg, kid = _check_header(unverified_header)
    unverified_issuer = unverified_claims.get("iss")
    if not isinstance(unverified_issuer, str):
        raise _refuse(f"{role} token has no iss")
    trusted = issuers.find_issuer(unverified_issuer)
    if trusted is None:
        raise _refuse(f"{role} token issuer is not trusted")
    if alg not in trusted.algorithms:
        raise _refuse(f"{role} token alg is not allowed for its issuer")
    key = trusted.find_key(kid)
    if key is None:
        raise _refuse(f"{role} token kid is unknown to its issuer")
    if alg not in key.algorithms:
        raise _refuse(f"{role} token alg does not fit the key")

    try:
        verified_claims = jws.decode(  # PyJWT's decoder: see sidecar/exchange/jws.py
            token,
            key.key,
            algorithms=[alg],  # exactly the one algorithm checked above
            issuer=trusted.issuer,  # exact comparison
            audience=list(trusted.audiences),  # aud must contain one of them
            leeway=leeway,
            options={
                "verify_signature": True,
                "verify_exp": True,
                "verify_nbf": True,
                "verify_iat": True,
                "verify_iss": True,
                "verify_aud": True,
                "strict_aud": False,
                "require": ["exp", "iss", "aud", "sub"],
            },
        )
    except Exception as exc:  # PyJWTError, and overflow/type errors from hostile claim values
        raise _refuse(f"{role} token failed verification: {type(exc).__name__}") from exc

    subject = verified_claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise _refuse(f"{role} token sub is not a non-empty string")
    if any(name in verified_claims for name in ID_TOKEN_CLAIMS):
        raise _refuse(f"{role} token is an ID token")
    # RFC 7519 §2: a NumericDate is a JSON number, and RFC 8259 §6 leaves numbers beyond the
    # range of binary64 without interoperable meaning. PyJWT checks these claims through int(),
    # which takes "1700000000" (a string) and a 400-digit integer alike: refuse both here.
    for name in ("exp", "nbf", "iat"):
        if name in verified_claims and not _is_numeric_date(verified_claims[name]):
            raise _refuse(f"{role} token {name} is not a NumericDate")
    exp = verified_claims["exp"]
    verified = VerifiedToken(
        issuer=trusted.issuer,
        subject=subject,
        claims=verified_claims,
        scopes=scopes_of(verified_claims),
        expires_at=int(exp),
        fingerprint=(digest or token_digest(token)).hex()[:16],
    )
    return verified, key


def jwk_algorithms(jwk: Mapping[str, Any], allowed: frozenset[str]) -> frozenset[str]:
    """The algorithms a JWK may verify: its ``alg`` if stated, else those of its key type."""
    stated = jwk.get("alg")
    if isinstance(stated, str):
        return frozenset({stated}) & allowed
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "RSA":
        family = {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
    elif kty == "EC":
        family = {{"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}.get(str(crv), "")}
    elif kty == "OKP" and crv == "Ed25519":
        family = {"EdDSA"}
    else:
        family = set()
    return frozenset(family) & allowed
