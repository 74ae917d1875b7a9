"""The upstream verifier: tokens signed in the test with keys generated here, checked against a
real JWKS served over HTTP on loopback (whose requests are counted), through the plain function,
the class and the Flask decorator."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from flask import Flask, g, jsonify
from jwt.algorithms import get_default_algorithms

from sidecar import verify
from sidecar.verify import (
    InsufficientScope,
    InvalidToken,
    JwksUnavailable,
    MissingToken,
    TokenVerifier,
    VerificationError,
    bearer_token,
    verify_token,
)
from tests.conftest import FakeClock

ISSUER = "https://token-sidecar.internal"
AUDIENCE = "https://code-search.internal/mcp"
OTHER_AUDIENCE = "https://tickets.internal/mcp"
REMOVE = object()  # a claim override that deletes the claim


@dataclass
class SigningKey:
    kid: str
    algorithm: str
    private_key: Any

    def public_jwk(self) -> dict[str, Any]:
        algorithm = get_default_algorithms()[self.algorithm]
        jwk = algorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "alg": self.algorithm, "use": "sig"}


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {
        "ES256": SigningKey("ec-1", "ES256", ec.generate_private_key(ec.SECP256R1())),
        "RS256": SigningKey("rsa-1", "RS256", rsa.generate_private_key(65537, 2048)),
        "EdDSA": SigningKey("ed-1", "EdDSA", ed25519.Ed25519PrivateKey.generate()),
    }


@dataclass
class JwksServer:
    """A JWKS endpoint on loopback: what it serves can change mid-test; every GET is counted."""

    url: str
    keys: list[dict[str, Any]]
    status: int = 200
    hits: list[str] = field(default_factory=list)


def _handler(state: dict[str, JwksServer]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            server = state["server"]
            server.hits.append(self.path)
            body = json.dumps({"keys": server.keys}).encode()
            self.send_response(server.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@pytest.fixture(scope="module")
def jwks_endpoint() -> Iterator[tuple[str, dict[str, JwksServer]]]:
    state: dict[str, JwksServer] = {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/.well-known/jwks.json", state
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


@pytest.fixture
def jwks(
    jwks_endpoint: tuple[str, dict[str, JwksServer]], keys: dict[str, SigningKey]
) -> JwksServer:
    """The endpoint, serving this test's keys and counting this test's requests."""
    url, state = jwks_endpoint
    state["server"] = JwksServer(url=url, keys=[key.public_jwk() for key in keys.values()])
    return state["server"]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


@pytest.fixture
def make_verifier(
    jwks: JwksServer, clock: FakeClock, session: requests.Session
) -> Callable[..., TokenVerifier]:
    def make(**settings: Any) -> TokenVerifier:
        settings = {"jwks_uri": jwks.url, "clock": clock, "session": session, **settings}
        return TokenVerifier(issuer=ISSUER, audience=AUDIENCE, **settings)

    return make


@pytest.fixture
def verifier(make_verifier: Callable[..., TokenVerifier]) -> TokenVerifier:
    return make_verifier()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "alice",
        "aud": AUDIENCE,
        "client_id": "gateway",
        "scope": "code.read code.search",
        "iat": now,
        "exp": now + 300,
        "jti": str(uuid.uuid4()),
        "act": {"sub": "gateway", "act": {"sub": "other"}},
    }
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not REMOVE}


def sign(key: SigningKey, payload: dict[str, Any] | None = None, **header: Any) -> str:
    headers = {"kid": key.kid, "typ": "at+jwt", **header}
    if headers["typ"] is REMOVE:
        headers["typ"] = None  # PyJWT then leaves typ out, rather than writing its default "JWT"
    headers = {name: value for name, value in headers.items() if value is not REMOVE}
    return jwt.encode(
        payload or claims(), key.private_key, algorithm=key.algorithm, headers=headers
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(
    header: dict[str, Any], payload: dict[str, Any], sign: Callable[[bytes], bytes]
) -> str:
    """A compact JWS built by hand: PyJWT refuses to make the forgeries below."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


# --- accepted tokens ----------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["ES256", "RS256", "EdDSA"])
def test_a_valid_token_yields_its_verified_claims(
    verifier: TokenVerifier, keys: dict[str, SigningKey], algorithm: str
) -> None:
    payload = claims()

    verified = verifier.verify(sign(keys[algorithm], payload))

    assert verified.claims == payload
    assert verified.subject == "alice"
    assert verified.client_id == "gateway"
    assert verified.jti == payload["jti"]
    assert verified.expires_at == payload["exp"]
    assert verified.scopes == {"code.read", "code.search"}
    assert verified.actors == ("gateway", "other")


def test_an_audience_list_holding_our_audience_is_accepted(
    verifier: TokenVerifier, keys: dict[str, SigningKey]
) -> None:
    token = sign(keys["ES256"], claims(aud=[OTHER_AUDIENCE, AUDIENCE]))

    assert verifier.verify(token).subject == "alice"


@pytest.mark.parametrize("typ", ["at+jwt", "AT+JWT", "application/at+jwt"])
def test_typ_at_jwt_is_accepted_in_either_form_and_any_case(
    verifier: TokenVerifier, keys: dict[str, SigningKey], typ: str
) -> None:
    assert verifier.verify(sign(keys["ES256"], typ=typ)).subject == "alice"


def test_a_token_without_scope_or_act_has_no_scopes_and_no_actors(
    verifier: TokenVerifier, keys: dict[str, SigningKey]
) -> None:
    verified = verifier.verify(sign(keys["ES256"], claims(scope=REMOVE, act=REMOVE)))

    assert verified.scopes == frozenset()
    assert verified.actors == ()


def test_has_scopes_is_true_only_for_scopes_all_granted(
    verifier: TokenVerifier, keys: dict[str, SigningKey]
) -> None:
    verified = verifier.verify(sign(keys["ES256"]))

    assert verified.has_scopes("code.read", "code.search")
    assert not verified.has_scopes("code.read", "code.write")


def test_the_verified_token_does_not_hold_the_token(
    verifier: TokenVerifier, keys: dict[str, SigningKey]
) -> None:
    token = sign(keys["ES256"])

    verified = verifier.verify(token)

    assert token not in repr(verified)
    assert token not in json.dumps(verified.claims)


# --- refused tokens -----------------------------------------------------------------------------


def _hs256_keyed_with_the_rsa_public_key(keys: dict[str, SigningKey]) -> str:
    public_pem = (
        keys["RS256"]
        .private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = {"alg": "HS256", "kid": "rsa-1", "typ": "at+jwt"}
    return hand_made(
        header, claims(), lambda data: hmac.new(public_pem, data, hashlib.sha256).digest()
    )


def _alg_none(keys: dict[str, SigningKey]) -> str:
    return hand_made({"alg": "none", "kid": "ec-1", "typ": "at+jwt"}, claims(), lambda _: b"")


def _rs256_under_the_ec_kid(keys: dict[str, SigningKey]) -> str:
    return sign(keys["RS256"], kid=keys["ES256"].kid)


def _tampered_signature(keys: dict[str, SigningKey]) -> str:
    header, payload, signature = sign(keys["ES256"]).split(".")
    middle = len(signature) // 2
    flipped = "A" if signature[middle] != "A" else "B"
    return f"{header}.{payload}.{signature[:middle]}{flipped}{signature[middle + 1 :]}"


def _tampered_claims(keys: dict[str, SigningKey]) -> str:
    header, _, signature = sign(keys["ES256"]).split(".")
    return f"{header}.{b64(json.dumps(claims(sub='mallory')).encode())}.{signature}"


def _by_es256(**overrides: Any) -> Callable[[dict[str, SigningKey]], str]:
    return lambda keys: sign(keys["ES256"], claims(**overrides))


def _header(**header: Any) -> Callable[[dict[str, SigningKey]], str]:
    return lambda keys: sign(keys["ES256"], **header)


def _timed(**offsets: int) -> Callable[[dict[str, SigningKey]], str]:
    """Time claims this many seconds from now (now being when the test runs)."""
    return lambda keys: sign(
        keys["ES256"],
        claims(**{name: int(time.time()) + offset for name, offset in offsets.items()}),
    )


# name: (the token, the check that refuses it, as the exception's reason names it)
REFUSED: dict[str, tuple[Callable[[dict[str, SigningKey]], str], str]] = {
    "wrong aud": (_by_es256(aud=OTHER_AUDIENCE), "InvalidAudienceError"),
    "aud list without ours": (
        _by_es256(aud=[OTHER_AUDIENCE, "https://x.internal"]),
        "InvalidAudienceError",
    ),
    "wrong iss": (_by_es256(iss="https://idp.internal"), "InvalidIssuerError"),
    "iss with a trailing slash": (_by_es256(iss=ISSUER + "/"), "InvalidIssuerError"),
    "typ JWT": (_header(typ="JWT"), "typ is not at\\+jwt"),
    "typ missing": (_header(typ=REMOVE), "typ is not at\\+jwt"),
    "kid missing": (_header(kid=REMOVE), "no kid"),
    "expired beyond the leeway": (_timed(iat=-600, exp=-60), "ExpiredSignatureError"),
    "iat in the future": (_timed(iat=120), "ImmatureSignatureError"),
    "nbf in the future": (_timed(nbf=120), "ImmatureSignatureError"),
    **{
        f"{name} missing": (_by_es256(**{name: REMOVE}), "MissingRequiredClaimError")
        for name in verify.RFC9068_CLAIMS
    },
    "sub empty": (_by_es256(sub=""), "sub is not a non-empty string"),
    "client_id not a string": (_by_es256(client_id=["gateway"]), "client_id is not"),
    "scope not a string": (_by_es256(scope=["code.read"]), "scope is not a string"),
    "act without sub": (_by_es256(act={"act": {"sub": "gateway"}}), "act is not an actor"),
    "HS256 keyed with the RSA public key": (
        _hs256_keyed_with_the_rsa_public_key,
        "alg does not match the key",
    ),
    "header alg RS256 on the EC key": (_rs256_under_the_ec_kid, "alg does not match the key"),
    "alg none": (_alg_none, "alg does not match the key"),
    "tampered signature": (_tampered_signature, "InvalidSignatureError"),
    "tampered claims": (_tampered_claims, "InvalidSignatureError"),
    "not a JWT": (lambda keys: "not-a-jwt", "malformed token"),
}


@pytest.mark.parametrize(("make_token", "check"), REFUSED.values(), ids=REFUSED.keys())
def test_a_wrong_token_is_refused_as_invalid_token_without_echoing_it(
    verifier: TokenVerifier,
    keys: dict[str, SigningKey],
    make_token: Callable[[dict[str, SigningKey]], str],
    check: str,
) -> None:
    token = make_token(keys)

    with pytest.raises(InvalidToken, match=check) as refused:
        verifier.verify(token)

    assert (refused.value.status, refused.value.error) == (401, "invalid_token")
    for text in (str(refused.value), refused.value.description, refused.value.www_authenticate()):
        assert token not in text


def test_a_token_of_an_unknown_kid_is_refused_after_one_refetch(
    verifier: TokenVerifier, keys: dict[str, SigningKey], jwks: JwksServer, clock: FakeClock
) -> None:
    verifier.verify(sign(keys["ES256"]))
    clock.advance(31)
    stranger = SigningKey("stranger", "ES256", ec.generate_private_key(ec.SECP256R1()))

    with pytest.raises(InvalidToken, match="unknown kid"):
        verifier.verify(sign(stranger))

    assert len(jwks.hits) == 2


def test_a_key_whose_alg_is_not_allowed_is_not_used(
    make_verifier: Callable[..., TokenVerifier], keys: dict[str, SigningKey]
) -> None:
    verifier = make_verifier(algorithms=["ES256"])

    with pytest.raises(InvalidToken, match="unknown kid"):
        verifier.verify(sign(keys["RS256"]))


def test_a_token_lacking_a_required_scope_is_refused_as_insufficient_scope(
    verifier: TokenVerifier, keys: dict[str, SigningKey]
) -> None:
    token = sign(keys["ES256"])

    with pytest.raises(InsufficientScope) as refused:
        verifier.verify(token, scopes=["code.read", "code.write"])

    assert (refused.value.status, refused.value.error) == (403, "insufficient_scope")
    assert refused.value.scopes == ("code.read", "code.write")
    assert token not in refused.value.www_authenticate()


# --- the JWKS cache -----------------------------------------------------------------------------


def test_the_jwks_is_fetched_once_for_many_tokens(
    verifier: TokenVerifier, keys: dict[str, SigningKey], jwks: JwksServer
) -> None:
    for key in [*keys.values()] * 5:
        verifier.verify(sign(key))

    assert jwks.hits == ["/.well-known/jwks.json"]


def test_the_jwks_is_refetched_once_its_cache_ttl_has_passed(
    verifier: TokenVerifier, keys: dict[str, SigningKey], jwks: JwksServer, clock: FakeClock
) -> None:
    verifier.verify(sign(keys["ES256"]))
    clock.advance(299)
    verifier.verify(sign(keys["ES256"]))
    assert len(jwks.hits) == 1

    clock.advance(2)
    verifier.verify(sign(keys["ES256"]))

    assert len(jwks.hits) == 2


def test_unknown_kids_cause_at_most_one_refetch_per_refresh_interval(
    verifier: TokenVerifier, keys: dict[str, SigningKey], jwks: JwksServer, clock: FakeClock
) -> None:
    verifier.verify(sign(keys["ES256"]))
    clock.advance(31)
    strangers = [sign(keys["ES256"], kid=f"made-up-{n}") for n in range(20)]

    for token in strangers:
        with pytest.raises(InvalidToken):
            verifier.verify(token)
    assert len(jwks.hits) == 2

    clock.advance(30)
    for token in strangers:
        with pytest.raises(InvalidToken):
            verifier.verify(token)
    assert len(jwks.hits) == 3


def test_concurrent_unknown_kids_do_not_stampede_the_jwks(
    verifier: TokenVerifier, keys: dict[str, SigningKey], jwks: JwksServer
) -> None:
    start = threading.Barrier(16)
    outcomes: list[type[Exception]] = []

    def verify_a_stranger(n: int) -> None:
        token = sign(keys["ES256"], kid=f"made-up-{n}")
        start.wait()
        try:
            verifier.verify(token)
        except VerificationError as error:
            outcomes.append(type(error))

    threads = [threading.Thread(target=verify_a_stranger, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert outcomes == [InvalidToken] * 16
    assert len(jwks.hits) == 1


def test_a_rotated_in_key_is_picked_up_by_the_refetch(
    verifier: TokenVerifier, keys: dict[str, SigningKey], jwks: JwksServer, clock: FakeClock
) -> None:
    verifier.verify(sign(keys["ES256"]))
    rotated = SigningKey("ec-2", "ES256", ec.generate_private_key(ec.SECP256R1()))
    jwks.keys = [rotated.public_jwk(), *jwks.keys]
    clock.advance(31)

    assert verifier.verify(sign(rotated)).subject == "alice"
    assert len(jwks.hits) == 2


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/.well-known/jwks.json"


def test_an_unreachable_jwks_with_nothing_cached_fails_closed(
    make_verifier: Callable[..., TokenVerifier], keys: dict[str, SigningKey]
) -> None:
    verifier = make_verifier(jwks_uri=_closed_port_url())

    with pytest.raises(JwksUnavailable) as refused:
        verifier.verify(sign(keys["ES256"]))

    assert (refused.value.status, refused.value.error) == (503, "temporarily_unavailable")


def test_a_jwks_answering_an_error_with_nothing_cached_fails_closed(
    verifier: TokenVerifier, keys: dict[str, SigningKey], jwks: JwksServer
) -> None:
    jwks.status = 500

    with pytest.raises(JwksUnavailable):
        verifier.verify(sign(keys["ES256"]))


def test_cached_keys_stay_in_use_while_the_jwks_is_failing(
    verifier: TokenVerifier, keys: dict[str, SigningKey], jwks: JwksServer, clock: FakeClock
) -> None:
    verifier.verify(sign(keys["ES256"]))
    jwks.status = 500
    clock.advance(301)

    assert verifier.verify(sign(keys["ES256"])).subject == "alice"
    assert len(jwks.hits) == 2


def test_cached_keys_are_refused_once_older_than_max_stale(
    verifier: TokenVerifier, keys: dict[str, SigningKey], jwks: JwksServer, clock: FakeClock
) -> None:
    verifier.verify(sign(keys["ES256"]))
    jwks.status = 500
    clock.advance(3601)

    with pytest.raises(JwksUnavailable):
        verifier.verify(sign(keys["ES256"]))


def test_unusable_keys_of_the_jwks_are_skipped_and_the_good_ones_kept(
    verifier: TokenVerifier, keys: dict[str, SigningKey], jwks: JwksServer
) -> None:
    good = keys["ES256"].public_jwk()
    jwks.keys = [
        {"kty": "oct", "k": b64(b"shared-secret"), "kid": "hmac", "alg": "HS256"},
        {**good, "kid": "alg-not-a-string", "alg": ["ES256"]},
        {**good, "kid": "for-encryption", "use": "enc"},
        {"kty": "EC", "crv": "P-256", "kid": "broken", "alg": "ES256", "x": "AA", "y": "AA"},
        "not-a-key",
        good,
    ]
    hmac_token = hand_made(
        {"alg": "HS256", "kid": "hmac", "typ": "at+jwt"},
        claims(),
        lambda data: hmac.new(b"shared-secret", data, hashlib.sha256).digest(),
    )

    assert verifier.verify(sign(keys["ES256"])).subject == "alice"
    for token in (hmac_token, sign(keys["ES256"], kid="alg-not-a-string")):
        with pytest.raises(InvalidToken, match="unknown kid"):
            verifier.verify(token)


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")  # signing with it
def test_an_rsa_key_below_2048_bits_does_not_verify(
    verifier: TokenVerifier, jwks: JwksServer
) -> None:
    small = SigningKey("rsa-small", "RS256", rsa.generate_private_key(65537, 1024))
    jwks.keys = [small.public_jwk()]

    with pytest.raises(InvalidToken):
        verifier.verify(sign(small))


# --- construction -------------------------------------------------------------------------------


def test_a_verifier_without_an_audience_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="no-audience rule"):
        TokenVerifier(issuer=ISSUER, audience="")


@pytest.mark.parametrize("algorithm", ["none", "HS256", "HS512"])
def test_a_verifier_refuses_none_and_hmac_algorithms(algorithm: str) -> None:
    with pytest.raises(ValueError, match="asymmetric"):
        TokenVerifier(issuer=ISSUER, audience=AUDIENCE, algorithms=["ES256", algorithm])


def test_required_claims_can_be_added_but_not_removed(
    make_verifier: Callable[..., TokenVerifier], keys: dict[str, SigningKey]
) -> None:
    verifier = make_verifier(required_claims=["scope"])

    with pytest.raises(InvalidToken):
        verifier.verify(sign(keys["ES256"], claims(jti=REMOVE)))
    with pytest.raises(InvalidToken):
        verifier.verify(sign(keys["ES256"], claims(scope=REMOVE)))


# --- the plain function -------------------------------------------------------------------------


def test_verify_token_verifies_with_one_cached_verifier_per_configuration(
    monkeypatch: pytest.MonkeyPatch, keys: dict[str, SigningKey], jwks: JwksServer
) -> None:
    monkeypatch.setattr(verify, "_verifiers", {})

    for _ in range(3):
        verified = verify_token(
            sign(keys["ES256"]), issuer=ISSUER, audience=AUDIENCE, jwks_uri=jwks.url
        )

    assert verified.subject == "alice"
    assert len(jwks.hits) == 1
    with pytest.raises(InsufficientScope):
        verify_token(
            sign(keys["ES256"]),
            issuer=ISSUER,
            audience=AUDIENCE,
            jwks_uri=jwks.url,
            scopes=["admin"],
        )


# --- the Authorization header and the challenge -------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer abc.DEF-123_~+/", "abc.DEF-123_~+/"),
        ("bearer abc==", "abc=="),
        ("BEARER   abc", "abc"),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Bearer a b", None),
        ("Bearer a,b", None),
        ("Bearer a=b", None),
        ("Bearer\tabc", None),
        ("Basic YWxhZGRpbjpvcGVuc2VzYW1l", None),
        ("Bearerabc", None),
    ],
)
def test_bearer_token_extracts_one_rfc6750_token(header: str | None, expected: str | None) -> None:
    assert bearer_token(header) == expected


def test_the_invalid_token_challenge_names_the_error_and_realm() -> None:
    challenge = InvalidToken("expired").www_authenticate("code-search")

    assert challenge == (
        'Bearer realm="code-search", error="invalid_token", '
        'error_description="The access token is invalid."'
    )


def test_the_insufficient_scope_challenge_names_the_scopes() -> None:
    challenge = InsufficientScope(["code.write", "code.read"]).www_authenticate()

    assert challenge == (
        'Bearer error="insufficient_scope", '
        'error_description="The access token lacks a required scope.", scope="code.read code.write"'
    )


def test_the_missing_token_challenge_has_no_error_code() -> None:
    assert MissingToken().www_authenticate() == "Bearer"
    assert MissingToken().www_authenticate("code-search") == 'Bearer realm="code-search"'


# --- the Flask decorator ------------------------------------------------------------------------


@pytest.fixture
def client(make_verifier: Callable[..., TokenVerifier]) -> Any:
    verifier = make_verifier(realm="code-search")
    app = Flask(__name__)

    @app.route("/search", methods=["GET", "POST"])
    @verifier.require("code.search")
    def search() -> Any:
        return jsonify(subject=g.token.subject, same=g.sidecar_token is g.token)

    @app.route("/write")
    @verifier.require("code.write")
    def write() -> Any:
        return jsonify(written=True)

    return app.test_client()


def test_the_decorator_passes_a_verified_token_to_the_view(
    client: Any, keys: dict[str, SigningKey]
) -> None:
    response = client.get("/search", headers={"Authorization": f"Bearer {sign(keys['ES256'])}"})

    assert response.status_code == 200
    assert response.json == {"subject": "alice", "same": True}


def test_the_decorator_answers_a_missing_token_with_a_bare_challenge(client: Any) -> None:
    response = client.get("/search")

    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="code-search"'
    assert response.json["error"] == "invalid_token"


def test_the_decorator_answers_an_invalid_token_with_401_and_no_echo(
    client: Any, keys: dict[str, SigningKey]
) -> None:
    token = sign(keys["ES256"], claims(aud=OTHER_AUDIENCE))

    response = client.get("/search", headers={"Authorization": f"Bearer {token}"})

    assert response.status_code == 401
    assert response.json == {
        "error": "invalid_token",
        "error_description": "The access token is invalid.",
    }
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert response.headers["Cache-Control"] == "no-store"
    assert token not in response.get_data(as_text=True)
    assert token not in str(response.headers)


def test_the_decorator_answers_a_missing_scope_with_403(
    client: Any, keys: dict[str, SigningKey]
) -> None:
    response = client.get("/write", headers={"Authorization": f"Bearer {sign(keys['ES256'])}"})

    assert response.status_code == 403
    assert response.json["error"] == "insufficient_scope"
    assert 'scope="code.write"' in response.headers["WWW-Authenticate"]


def test_the_decorator_does_not_take_a_token_from_the_query_or_the_form(
    client: Any, keys: dict[str, SigningKey]
) -> None:
    token = sign(keys["ES256"])

    from_query = client.get("/search", query_string={"access_token": token})
    from_form = client.post("/search", data={"access_token": token})

    assert (from_query.status_code, from_form.status_code) == (401, 401)
    assert from_query.headers["WWW-Authenticate"] == 'Bearer realm="code-search"'


def test_the_decorator_answers_503_when_the_jwks_is_unavailable(
    client: Any, keys: dict[str, SigningKey], jwks: JwksServer
) -> None:
    jwks.status = 503

    response = client.get("/search", headers={"Authorization": f"Bearer {sign(keys['ES256'])}"})

    assert response.status_code == 503
    assert response.json["error"] == "temporarily_unavailable"
