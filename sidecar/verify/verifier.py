"""The verifier itself: the checks of RFC 9068 §4 on one token, and the Flask decorator."""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ParamSpec

import jwt
import requests

from .errors import InsufficientScope, InvalidToken, MissingToken, VerificationError
from .jwks import JwksCache

log = logging.getLogger(__package__)  # the package's logger, as before the module was split

P = ParamSpec("P")

DEFAULT_ALGORITHMS = ("ES256", "EdDSA", "RS256", "PS256")
# Asymmetric only: "none" and HMAC (whose secret an attacker would read from the JWKS) never.
SUPPORTED_ALGORITHMS = frozenset(
    {"ES256", "ES384", "ES512", "EdDSA", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
)
# RFC 9068 §2.2: the claims every JWT access token carries. Configuration may add, not remove.
RFC9068_CLAIMS = ("iss", "sub", "aud", "exp", "iat", "jti", "client_id")
ACCEPTED_TYP = frozenset({"at+jwt", "application/at+jwt"})
MAX_ACT_DEPTH = 16
# RFC 6750 §2.1: credentials = "Bearer" 1*SP b64token
BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9._~+/-]+=*)")
# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ); also safe inside a quoted-string.
SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
QUOTABLE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]+")  # the same, and spaces


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """The verified claims of an access token (never the token itself: see the package doc)."""

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
        self._jwks = JwksCache(
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
