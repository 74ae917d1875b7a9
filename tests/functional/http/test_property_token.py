"""Generated requests thrown at POST /token over real HTTP (issue 6): random forms (our real
parameter names and values mixed with arbitrary ones, repeated, empty, control characters, raw
bytes, any content type) carrying generated tokens (random headers and claims, signed for real
with the test IdP's keys, or not). Whatever arrives, the answer is never a 5xx, never a token
with an error, always JSON with the no-store headers and an ``error`` of the docs/design.md §2
table."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import pytest
import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from jwt.algorithms import get_default_algorithms

from tests.conftest import (
    ACCESS_TOKEN_TYPE,
    CLIENT_ASSERTION_TYPE,
    CODE_SEARCH,
    DISABLED,
    GATEWAY_SECRET,
    JWT_TOKEN_TYPE,
    OTHER_SECRET,
    SIDECAR_ISSUER,
    TICKETS,
    TOKEN_EXCHANGE,
    ClientKeys,
    LiveServer,
    TestIdP,
    live_service,
)
from tests.functional.http.helpers import (
    CLIENT_CREDENTIAL_PARAMETERS,
    REQUEST_PARAMETERS,
    send_exactly,
)

# docs/design.md §2: every error code the token endpoint may answer with.
DESIGN_ERRORS = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "invalid_target",
        "temporarily_unavailable",
        "server_error",
    }
)
FORM = "application/x-www-form-urlencoded"
PARAMETER_NAMES = (*REQUEST_PARAMETERS, *CLIENT_CREDENTIAL_PARAMETERS)
REAL_VALUES = (
    TOKEN_EXCHANGE,
    "client_credentials",
    ACCESS_TOKEN_TYPE,
    JWT_TOKEN_TYPE,
    "urn:ietf:params:oauth:token-type:id_token",
    CODE_SEARCH,
    TICKETS,
    DISABLED,
    CODE_SEARCH + "/",
    "http://169.254.169.254/",
    "code.read",
    "code.read code.search",
    "tickets.read",
    "*",
    "gateway",
    "jwt-gateway",
    "no-exchange",
    GATEWAY_SECRET,
    OTHER_SECRET,
    CLIENT_ASSERTION_TYPE,
)
CONTENT_TYPES = (
    FORM,
    FORM + "; charset=UTF-8",
    "application/json",
    "multipart/form-data; boundary=x",
    "text/plain",
    "application/octet-stream",
    None,
)


@dataclass
class Target:
    idp: TestIdP
    client_keys: ClientKeys
    server: LiveServer


@pytest.fixture(scope="module")
def target(
    gateway_idp: TestIdP, gateway_client_keys: ClientKeys, gateway_config: dict[str, Any]
) -> Iterator[Target]:
    # Module-scoped (the module's IdP, client keys and configuration: tests/conftest.py): one
    # server takes every generated request (a server per example would spend the time budget on
    # migrations).
    with live_service(gateway_config) as (_, server):
        yield Target(gateway_idp, gateway_client_keys, server)


# --- generated tokens ---------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# Values of the wrong type, or numbers no date can be: NaN and infinities are written as the
# non-standard JSON tokens Python's parser accepts.
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


def _from_now(offset: int) -> int:
    return int(time.time()) + offset


# Relative to the time of the request, mapped after the draw: the draws stay reproducible.
numeric_dates = st.one_of(
    st.integers(-3600, 3600).map(_from_now),
    st.integers(-(10**12), 10**12).map(_from_now),
    st.floats(allow_nan=True, allow_infinity=True),
    st.just(10**400),
    st.just(600).map(lambda offset: str(_from_now(offset))),
    json_values,
)


def often(draw: st.DrawFn, percent: int) -> bool:
    """True ``percent`` times in a hundred (and, shrunk, True: towards the well-formed case)."""
    return draw(st.integers(0, 99)) < percent


def usually(draw: st.DrawFn, likely: Any, other: st.SearchStrategy[Any], percent: int = 80) -> Any:
    return likely if often(draw, percent) else draw(other)


@st.composite
def tokens(draw: st.DrawFn, target: Target) -> str:
    """A JWS, mostly well-formed and genuinely signed, with something (or nothing) wrong."""
    idp = target.idp
    kid, alg, key = draw(
        st.sampled_from([("rsa-1", "RS256", idp.rsa_key), ("ec-1", "ES256", idp.ec_key)])
    )
    header: dict[str, Any] = {
        "alg": usually(
            draw,
            alg,
            st.sampled_from(["RS256", "ES256", "PS256", "HS256", "none", "None", "EdDSA"])
            | st.text(max_size=8),
        ),
        "kid": usually(draw, kid, st.sampled_from(["rsa-1", "ec-1", "unknown"]) | json_values),
        "typ": usually(draw, "JWT", st.sampled_from(["at+jwt", "id_token+jwt"]) | json_values),
    }
    optional_headers = {
        "jku": st.just("http://127.0.0.1:9/jwks.json"),
        "x5u": st.just("http://127.0.0.1:9/cert.pem"),
        "jwk": st.just({"kty": "oct", "k": "c2VjcmV0"}),
        "crit": st.just(["exp"]),
        "b64": st.booleans(),
        "enc": st.just("A256GCM"),
        "cty": json_values,
    }
    if not often(draw, 80):
        for name in draw(st.sets(st.sampled_from(sorted(optional_headers)), max_size=2)):
            header[name] = draw(optional_headers[name])
    if not often(draw, 90):
        del header[draw(st.sampled_from(sorted(header)))]

    claims: dict[str, Any] = {
        "iss": usually(
            draw, idp.issuer, st.sampled_from([idp.issuer + "/", SIDECAR_ISSUER]) | json_values
        ),
        "sub": usually(draw, "alice@example.com", st.sampled_from(["agent-7", ""]) | json_values),
        "aud": usually(
            draw,
            idp.audience,
            st.sampled_from([[idp.audience, "x"], "https://x.example"]) | json_values,
        ),
        "exp": usually(draw, _from_now(600), numeric_dates),
        "scope": usually(
            draw,
            "code.read code.search",
            st.sampled_from(["tickets.read", "code.read", "*"]) | json_values,
        ),
    }
    optional_claims = {
        "nbf": numeric_dates,
        "iat": numeric_dates,
        "jti": json_values,
        "nonce": st.text(max_size=8),
        "may_act": st.fixed_dictionaries({"sub": st.sampled_from(["agent-7", "x"])}) | json_values,
        "act": st.fixed_dictionaries({"sub": st.sampled_from(["svc", ""])}) | json_values,
        "email": json_values,
    }
    if not often(draw, 60):
        for name in draw(st.sets(st.sampled_from(sorted(optional_claims)), max_size=3)):
            claims[name] = draw(optional_claims[name])
    if not often(draw, 90):
        del claims[draw(st.sampled_from(sorted(claims)))]

    # NaN and infinities are written as the non-standard tokens Python's parser (PyJWT's) reads.
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signer = draw(st.sampled_from(["genuine"] * 6 + ["rsa", "ec", "random", "empty"]))
    if signer == "genuine":
        signature = get_default_algorithms()[alg].sign(signing_input.encode(), key)
    elif signer in ("rsa", "ec"):
        other_alg, other_key = ("RS256", idp.rsa_key) if signer == "rsa" else ("ES256", idp.ec_key)
        signature = get_default_algorithms()[other_alg].sign(signing_input.encode(), other_key)
    elif signer == "random":
        signature = draw(st.binary(max_size=300))
    else:
        signature = b""
    token = f"{signing_input}.{_b64(signature)}"
    if not often(draw, 90):  # break the compact serialization itself
        token = draw(
            st.sampled_from([".".join(token.split(".")[:2]), token + ".", token + ".x.y"])
            | st.text(min_size=1, max_size=60)
        )
    return token


# --- generated requests -------------------------------------------------------------------------


@dataclass
class Request:
    body: bytes
    content_type: str | None
    auth: tuple[str, str] | None
    query: str


@st.composite
def requests_to_token(draw: st.DrawFn, target: Target) -> Request:
    values = st.one_of(st.sampled_from(REAL_VALUES), st.text(max_size=40), tokens(target))
    names = st.one_of(st.sampled_from(PARAMETER_NAMES), st.text(max_size=12))
    # Mostly a complete exchange, so that generation reaches past parsing into the grant.
    form: list[tuple[str, str]] = [
        ("grant_type", usually(draw, TOKEN_EXCHANGE, values, 90)),
        ("subject_token", draw(tokens(target))),
        ("subject_token_type", usually(draw, ACCESS_TOKEN_TYPE, values, 90)),
        ("audience", draw(st.sampled_from([CODE_SEARCH, TICKETS, DISABLED]) | values)),
    ]
    if not often(draw, 80):
        del form[draw(st.integers(0, len(form) - 1))]
    if not often(draw, 50):
        form += draw(st.lists(st.tuples(names, values), min_size=1, max_size=3))
    if not often(draw, 90):
        form.append(form[draw(st.integers(0, len(form) - 1))])  # a repeated parameter
    if not often(draw, 80):
        form = list(draw(st.permutations(form)))

    encoding = usually(draw, "form", st.sampled_from(["raw", "json"]), 90)
    if encoding == "form":
        body = urlencode(form).encode()
    elif encoding == "json":
        body = json.dumps(dict(form)).encode()
    else:
        body = draw(st.binary(max_size=200))

    auth = usually(
        draw,
        ("gateway", GATEWAY_SECRET),
        st.sampled_from([("gateway", "wrong"), ("no-exchange", OTHER_SECRET), None])
        | st.tuples(st.text(max_size=10), st.text(max_size=10)),
    )
    content_type = usually(
        draw,
        FORM,
        st.sampled_from(CONTENT_TYPES)
        | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30).map(
            str.strip
        ),
        90,
    )
    query = usually(draw, "", st.sampled_from(["debug=1", urlencode({"scope": "code.read"})]), 95)
    return Request(body, content_type, auth, query)


def send(target: Target, request: Request) -> requests.Response:
    url = target.server.token_url + (f"?{request.query}" if request.query else "")
    headers: dict[str, str] = {}
    if request.auth is not None:
        # Built here: requests would refuse a user name outside Latin-1; the server must not.
        credentials = ":".join(request.auth).encode()
        headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()
    return send_exactly("POST", url, request.body, request.content_type, headers=headers)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_any_request_gets_a_well_formed_answer_and_never_a_5xx(
    target: Target, data: st.DataObject
) -> None:
    request = data.draw(requests_to_token(target), label="request")

    response = send(target, request)

    assert response.status_code < 500, response.text
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Pragma"] == "no-cache"
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    event(f"{response.status_code} {body.get('error', 'granted')}")  # --hypothesis-show-statistics
    if response.status_code == 200:
        assert body["token_type"] == "Bearer"
        assert body["access_token"].count(".") == 2
        return
    assert body["error"] in DESIGN_ERRORS, body
    assert set(body) == {"error", "error_description"}, body
    assert "access_token" not in response.text
    assert "Traceback" not in response.text
