"""An upstream verifier: what an MCP server or API needs to accept the tokens this sidecar mints.

Standalone on purpose (the standard library, PyJWT, requests, and Flask only for the decorator):
copy this package into an upstream, or import it, without the rest of the sidecar. Its modules:
:mod:`.errors` (the refusals, as RFC 6750 challenges), :mod:`.jwks` (the JWKS cache and key
parsing) and :mod:`.verifier` (the checks, and the Flask decorator).

The validation of RFC 9068 §4 (https://www.rfc-editor.org/rfc/rfc9068#section-4), each step here:

- "The resource server MUST verify that the typ header value is at+jwt or application/at+jwt";
- the signature, with "the keys provided by the authorization server" (its JWKS, by ``kid``) and
  one algorithm, the key's own: a header ``alg`` that differs from it (``none``, HS256 keyed with
  the public key, RS256 on an EC key) is refused before any signature is checked;
- the issuer "MUST exactly match the value of the iss claim";
- ``aud`` must contain "an identifier the resource server expects for itself": a verifier
  cannot be built without one (the no-audience rule);
- ``exp``, ``nbf`` and ``iat`` with "some small leeway", and the claims of RFC 9068 §2.2 present;
- the scopes a request needs, every one in ``scope``.

Failures become RFC 6750 §3 challenges (https://www.rfc-editor.org/rfc/rfc6750#section-3).
The actor chain is the ``act`` claim of RFC 8693 §4.1, outermost (most recent) actor first.

The no-passthrough rule: a :class:`VerifiedToken` holds claims, never the token, and nothing
here returns the token it was given. An upstream must never forward the token it received (MCP
security best practices, "token passthrough"); for a further hop it uses its own credential, or
asks the sidecar for a token of that hop's audience.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from .errors import (
    InsufficientScope,
    InvalidToken,
    JwksUnavailable,
    MissingToken,
    VerificationError,
)
from .jwks import CURVE_ALGORITHMS, MAX_JWKS_BYTES, PRIVATE_MEMBERS
from .verifier import (
    ACCEPTED_TYP,
    BEARER,
    DEFAULT_ALGORITHMS,
    MAX_ACT_DEPTH,
    QUOTABLE,
    RFC9068_CLAIMS,
    SCOPE_TOKEN,
    SUPPORTED_ALGORITHMS,
    TokenVerifier,
    VerifiedToken,
    bearer_token,
)

__all__ = [
    "ACCEPTED_TYP",
    "BEARER",
    "CURVE_ALGORITHMS",
    "DEFAULT_ALGORITHMS",
    "MAX_ACT_DEPTH",
    "MAX_JWKS_BYTES",
    "PRIVATE_MEMBERS",
    "QUOTABLE",
    "RFC9068_CLAIMS",
    "SCOPE_TOKEN",
    "SUPPORTED_ALGORITHMS",
    "InsufficientScope",
    "InvalidToken",
    "JwksUnavailable",
    "MissingToken",
    "TokenVerifier",
    "VerificationError",
    "VerifiedToken",
    "bearer_token",
    "verify_token",
]

_verifiers: dict[tuple[str, str, str | None], TokenVerifier] = {}
_verifiers_lock = threading.Lock()


def verify_token(
    token: str,
    *,
    issuer: str,
    audience: str,
    jwks_uri: str | None = None,
    scopes: Iterable[str] = (),
) -> VerifiedToken:
    """:meth:`TokenVerifier.verify` with default settings, one verifier (and so one JWKS cache)
    per (issuer, audience, jwks_uri) for the life of the process."""
    with _verifiers_lock:
        verifier = _verifiers.get((issuer, audience, jwks_uri))
        if verifier is None:
            verifier = TokenVerifier(issuer=issuer, audience=audience, jwks_uri=jwks_uri)
            _verifiers[(issuer, audience, jwks_uri)] = verifier
    return verifier.verify(token, scopes=scopes)
