"""The success path of POST /token over real HTTP, against SQLite and PostgreSQL."""

from __future__ import annotations

import jwt
import pytest
from jwt import PyJWKClient

from sidecar.services import Services
from tests.conftest import ACCESS_TOKEN_TYPE, CODE_SEARCH, SIDECAR_ISSUER, LiveServer, TestIdP


@pytest.fixture
def config(config, database_url):  # type: ignore[no-untyped-def]
    config["database_url"] = database_url
    return config


def test_exchange_mints_an_audience_bound_rfc9068_token(
    server: LiveServer, idp: TestIdP, services: Services
) -> None:
    subject = idp.token(email="alice@example.com", groups=["eng"])

    response = server.exchange(subject, scope="code.read code.search")

    assert response.status_code == 200, response.text
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Pragma"] == "no-cache"
    body = response.json()
    assert body["issued_token_type"] == ACCESS_TOKEN_TYPE
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 120
    assert body["scope"] == "code.read code.search"

    header = jwt.get_unverified_header(body["access_token"])
    assert header["typ"] == "at+jwt"
    assert header["alg"] == "ES256"
    jwks = PyJWKClient(f"{server.url}/.well-known/jwks.json")
    key = jwks.get_signing_key_from_jwt(body["access_token"])
    claims = jwt.decode(
        body["access_token"],
        key,
        algorithms=["ES256"],
        audience=CODE_SEARCH,
        issuer=SIDECAR_ISSUER,
        options={"require": ["exp", "iat", "jti", "sub", "client_id"]},
    )
    assert claims["sub"] == "alice@example.com"
    assert claims["client_id"] == "gateway"
    assert claims["act"] == {"sub": "gateway"}
    assert claims["exp"] - claims["iat"] == 120
    assert claims["email"] == "alice@example.com"  # in the policy's copy_claims
    assert "groups" not in claims  # not in the policy's copy_claims
    assert subject not in response.text


def test_no_scope_requested_grants_the_policy_defaults(server: LiveServer, idp: TestIdP) -> None:
    response = server.exchange(idp.token())
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "code.read"
