"""An upstream verifier: what an MCP server or API needs to accept the tokens this sidecar mints.

Standalone on purpose (the standard library, PyJWT, requests, and Flask only for the decorator):
copy it into an upstream, or import it, without the rest of the sidecar.

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

import functools
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ParamSpec

import jwt
import requests

log = logging.getLogger(__name__)

P = ParamSpec("P")

DEFAULT_ALGORITHMS = ("ES256", "EdDSA", "RS256", "PS256")
# Asymmetric only: "none" and HMAC (whose secret an attacker would read from the JWKS) never.
SUPPORTED_ALGORITHMS = frozenset(
    {"ES256", "ES384", "ES512", "EdDSA", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
)
# RFC 9068 §2.2: the claims every JWT access token carries. Configuration may add, not remove.
RFC9068_CLAIMS = ("iss", "sub", "aud", "exp", "iat", "jti", "client_id")
ACCEPTED_TYP = frozenset({"at+jwt", "application/at+jwt"})
CURVE_ALGORITHMS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "Ed25519": "EdDSA"}
PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
MAX_JWKS_BYTES = 512 * 1024
MAX_ACT_DEPTH = 16
# RFC 6750 §2.1: credentials = "Bearer" 1*SP b64token
BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9._~+/-]+=*)")
# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ); also safe inside a quoted-string.
SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
QUOTABLE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]+")  # the same, and spaces


class VerificationError(Exception):
    """A token refused. ``description`` is fixed per class and never echoes the token; the
    exception's message (a reason for the upstream's own logs) names only which check failed."""

    error = "invalid_token"
    status = 401
    description = "The access token is invalid."

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason or self.description)

    def challenge_parameters(self) -> list[str]:
        return [f'error="{self.error}"', f'error_description="{self.description}"']

    def www_authenticate(self, realm: str | None = None) -> str:
        """The RFC 6750 §3 ``WWW-Authenticate`` value for this failure."""
        parameters = [f'realm="{realm}"'] if realm else []
        parameters += self.challenge_parameters()
        return f"Bearer {', '.join(parameters)}" if parameters else "Bearer"


class InvalidToken(VerificationError):
    """RFC 6750 §3.1 ``invalid_token``: malformed, expired, revoked, or not for this upstream."""


class MissingToken(InvalidToken):
    """No bearer token at all. RFC 6750 §3.1: "If the request lacks any authentication
    information ..., the resource server SHOULD NOT include an error code"."""

    description = "A bearer access token is required."

    def challenge_parameters(self) -> list[str]:
        return []


class InsufficientScope(VerificationError):
    """RFC 6750 §3.1 ``insufficient_scope`` (HTTP 403), naming the scopes the request needs."""

    error = "insufficient_scope"
    status = 403
    description = "The access token lacks a required scope."

    def __init__(self, required: Iterable[str]) -> None:
        self.scopes = tuple(sorted(required))
        super().__init__(f"scopes required: {' '.join(self.scopes)}")

    def challenge_parameters(self) -> list[str]:
        return [*super().challenge_parameters(), f'scope="{" ".join(self.scopes)}"']


class JwksUnavailable(VerificationError):
    """The sidecar's JWKS cannot be fetched and none is cached: fail closed, as a 503."""

    error = "temporarily_unavailable"
    status = 503
    description = "The token issuer's keys are unavailable."


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """The verified claims of an access token (never the token itself: see the module doc)."""

    claims: dict[str, Any]
    subject: str
    client_id: str
    scopes: frozenset[str]
    jti: str
    expires_at: int
    actors: tuple[str, ...]  # RFC 8693 §4.1 act chain: the current actor first, then prior ones

    def has_scopes(self, *scopes: str) -> bool:
        return set(scopes) <= self.scopes


def bearer_token(authorization_header: str | None) -> str | None:
    """The RFC 6750 §2.1 bearer token of an ``Authorization`` header value, or None."""
    if authorization_header is None:
        return None
    match = BEARER.fullmatch(authorization_header.strip(" \t"))
    return match.group(1) if match else None


@dataclass(frozen=True, slots=True)
class _Key:
    algorithm: str  # the only algorithm this key verifies: its JWK `alg`, or its curve's
    key: Any


@dataclass
class _JwksCache:
    """The sidecar's JWKS, fetched lazily, reused for ``cache_ttl`` seconds, and refetched (on
    expiry or an unknown ``kid``) at most once per ``refresh_interval`` under one lock, so that a
    flood of tokens with made-up ``kid`` values cannot turn into a flood of fetches."""

    uri: str
    algorithms: frozenset[str]
    refresh_interval: float
    cache_ttl: float
    max_stale: float
    timeout: float
    session: requests.Session
    clock: Callable[[], float]
    keys: dict[str, _Key] = field(default_factory=dict)
    fetched_at: float | None = None
    last_attempt: float = float("-inf")
    lock: threading.Lock = field(default_factory=threading.Lock)

    def find_key(self, kid: str) -> _Key | None:
        if kid not in self.keys or self._expired():
            with self.lock:  # one fetch at a time: the other threads wait for its keys
                if (kid not in self.keys or self._expired()) and self._may_fetch():
                    self._refresh()
        if self.fetched_at is None:
            raise JwksUnavailable("no JWKS fetched")
        if self.clock() - self.fetched_at > self.max_stale:
            # Fail closed: a key retired (or compromised) meanwhile must not verify for ever.
            raise JwksUnavailable("JWKS older than max_stale")
        return self.keys.get(kid)

    def _expired(self) -> bool:
        return self.fetched_at is None or self.clock() - self.fetched_at >= self.cache_ttl

    def _may_fetch(self) -> bool:
        return self.clock() - self.last_attempt >= self.refresh_interval

    def _refresh(self) -> None:
        self.last_attempt = self.clock()
        try:
            keys = self._parse(self._fetch())
        except (requests.RequestException, ValueError, RecursionError, JwksUnavailable) as exc:
            # Keys already held stay in use: a brief outage must not refuse valid tokens.
            log.warning("JWKS fetch from %s failed: %s", self.uri, type(exc).__name__)
            return
        self.keys, self.fetched_at = keys, self.clock()

    def _fetch(self) -> Any:
        with self.session.get(
            self.uri,
            timeout=self.timeout,
            allow_redirects=False,  # the keys come from the configured URL, nowhere else
            stream=True,
            headers={"Accept": "application/json"},
        ) as response:
            if response.status_code != 200:
                raise JwksUnavailable(f"HTTP {response.status_code}")
            body = b""
            for chunk in response.iter_content(64 * 1024):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise JwksUnavailable("JWKS too large")
        return json.loads(body)

    def _parse(self, document: Any) -> dict[str, _Key]:
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise JwksUnavailable("not a JWK Set")
        keys: dict[str, _Key] = {}
        for jwk in document["keys"]:
            if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
                continue
            kid, algorithm = jwk.get("kid"), _jwk_algorithm(jwk)
            if not isinstance(kid, str) or algorithm is None or algorithm not in self.algorithms:
                continue
            # Only the public members: a careless publisher's private ones are never loaded.
            public = {name: value for name, value in jwk.items() if name not in PRIVATE_MEMBERS}
            try:
                keys[kid] = _Key(algorithm, jwt.PyJWK(public, algorithm=algorithm).key)
            except Exception as exc:  # one bad key must not discard the good ones
                log.warning("JWKS %s: skipping key %r: %s", self.uri, kid, type(exc).__name__)
        return keys


def _jwk_algorithm(jwk: Mapping[str, Any]) -> str | None:
    # Without `alg`: the curve's algorithm, or RS256 for RSA (PyJWT's reading of such a key).
    # PyJWK then refuses a key whose `kty` does not fit.
    algorithm = jwk.get("alg") or CURVE_ALGORITHMS.get(str(jwk.get("crv")), "RS256")
    return algorithm if isinstance(algorithm, str) else None


class TokenVerifier:
    """Verifies the sidecar's access tokens for one upstream (one ``audience``).

    The JWKS (``jwks_uri``, by default the issuer's ``/.well-known/jwks.json``) is reused for
    ``cache_ttl`` seconds; it is fetched at most once per ``refresh_interval`` seconds, whether
    for expiry or an unknown ``kid``. ``clock`` (monotonic seconds) is for tests."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        jwks_uri: str | None = None,
        algorithms: Iterable[str] = DEFAULT_ALGORITHMS,
        leeway: int = 30,
        required_claims: Iterable[str] = RFC9068_CLAIMS,
        refresh_interval: float = 30.0,
        cache_ttl: float = 300.0,
        max_stale: float = 3600.0,
        timeout: float = 3.0,
        realm: str | None = None,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not issuer:
            raise ValueError("an issuer is required")
        if not audience or not isinstance(audience, str):
            raise ValueError("an audience is required: the no-audience rule")
        allowed = frozenset(algorithms)
        if not allowed or not allowed <= SUPPORTED_ALGORITHMS:
            raise ValueError(f"algorithms must be asymmetric, from {sorted(SUPPORTED_ALGORITHMS)}")
        self.required_claims = list(dict.fromkeys([*RFC9068_CLAIMS, *required_claims]))
        if realm is not None and not QUOTABLE.fullmatch(realm):
            raise ValueError("realm must be printable ASCII without quotes or backslashes")
        self.issuer, self.audience, self.leeway, self.realm = issuer, audience, leeway, realm
        self._jwks = _JwksCache(
            uri=jwks_uri or issuer.rstrip("/") + "/.well-known/jwks.json",
            algorithms=allowed,
            refresh_interval=refresh_interval,
            cache_ttl=cache_ttl,
            max_stale=max_stale,
            timeout=timeout,
            session=session or requests.Session(),
            clock=clock,
        )

    def verify(self, token: str, *, scopes: Iterable[str] = ()) -> VerifiedToken:
        """Verify an access token and that it grants every one of ``scopes``, or raise a
        :class:`VerificationError`."""
        try:
            unverified_header = jwt.get_unverified_header(token)
        except Exception as exc:  # any failure to parse hostile input is a refusal
            raise InvalidToken("malformed token") from exc
        typ = unverified_header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in ACCEPTED_TYP:
            raise InvalidToken("typ is not at+jwt")
        kid = unverified_header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidToken("no kid")
        key = self._jwks.find_key(kid)
        if key is None:
            raise InvalidToken("unknown kid")
        # The key decides the algorithm; the token's header only has to agree with it.
        if unverified_header.get("alg") != key.algorithm:
            raise InvalidToken("alg does not match the key")
        try:
            verified_claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],  # exactly the key's one algorithm
                issuer=self.issuer,  # exact string comparison
                audience=self.audience,  # this upstream's own identifier, in aud
                leeway=self.leeway,
                options={
                    "verify_signature": True,
                    "verify_exp": True,
                    "verify_nbf": True,
                    "verify_iat": True,  # and refused if in the future
                    "verify_iss": True,
                    "verify_aud": True,
                    "verify_sub": True,
                    "verify_jti": True,
                    "strict_aud": False,  # aud may be a list when several were requested
                    "enforce_minimum_key_length": True,
                    "require": self.required_claims,
                },
            )
        except Exception as exc:  # PyJWTError, and type errors from hostile claim values
            raise InvalidToken(f"verification failed: {type(exc).__name__}") from exc
        verified = _verified_token(verified_claims)
        required = frozenset(scopes)
        if not required <= verified.scopes:
            raise InsufficientScope(required)
        return verified

    def require(self, *scopes: str) -> Callable[[Callable[P, Any]], Callable[P, Any]]:
        """A Flask view decorator: the bearer token of the ``Authorization`` header (only: RFC
        6750 §2.3's query parameter is not supported), verified, lands in ``flask.g.token``."""
        import flask

        for scope in scopes:
            if not SCOPE_TOKEN.fullmatch(scope):
                raise ValueError(f"not a scope token: {scope!r}")

        def decorate(view: Callable[P, Any]) -> Callable[P, Any]:
            @functools.wraps(view)
            def guarded(*args: P.args, **kwargs: P.kwargs) -> Any:
                try:
                    token = bearer_token(flask.request.headers.get("Authorization"))
                    if token is None:
                        raise MissingToken()
                    verified = self.verify(token, scopes=scopes)
                except VerificationError as error:
                    log.info("bearer token refused: %s", error)  # the reason, never the token
                    response = flask.jsonify(error=error.error, error_description=error.description)
                    response.status_code = error.status
                    response.headers["Cache-Control"] = "no-store"
                    if error.status in (401, 403):
                        response.headers["WWW-Authenticate"] = error.www_authenticate(self.realm)
                    return response
                flask.g.token = flask.g.sidecar_token = verified
                return view(*args, **kwargs)

            return guarded

        return decorate


def _verified_token(claims: dict[str, Any]) -> VerifiedToken:
    for name in ("sub", "client_id", "jti"):
        if not isinstance(claims[name], str) or not claims[name]:
            raise InvalidToken(f"{name} is not a non-empty string")
    scope = claims.get("scope", "")
    if not isinstance(scope, str):
        raise InvalidToken("scope is not a string")
    return VerifiedToken(
        claims=claims,
        subject=claims["sub"],
        client_id=claims["client_id"],
        scopes=frozenset(scope.split()),
        jti=claims["jti"],
        expires_at=int(claims["exp"]),
        actors=_actors(claims),
    )


def _actors(claims: Mapping[str, Any]) -> tuple[str, ...]:
    actors: list[str] = []
    act = claims.get("act")
    while act is not None:
        if not isinstance(act, dict) or not isinstance(act.get("sub"), str):
            raise InvalidToken("act is not an actor claim")
        if len(actors) == MAX_ACT_DEPTH:
            raise InvalidToken("act nests too deeply")
        actors.append(act["sub"])
        act = act.get("act")
    return tuple(actors)


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
