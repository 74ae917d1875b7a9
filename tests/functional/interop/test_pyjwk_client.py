"""An upstream's view: minted tokens verified by PyJWT's ``PyJWKClient`` against our JWKS, the
way any RFC 9068 resource server verifies an access token."""

from __future__ import annotations

from typing import Any

import jwt
import pytest

from tests.conftest import CODE_SEARCH, SIDECAR_ISSUER, TICKETS, LiveServer, TestIdP
from tests.functional.http.helpers import jwks_client, verify_as_upstream


def minted_token(server: LiveServer, idp: TestIdP, audience: str) -> str:
    response = server.exchange(idp.token(scope="code.read tickets.read"), audience=audience)
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


def verified(server: LiveServer, token: str, audience: str) -> dict[str, Any]:
    """What an upstream does (tests/functional/http/helpers.py), with a JWKS client of its own."""
    return verify_as_upstream(jwks_client(server.url), token, audience)


def test_pyjwk_client_verifies_a_minted_token(server: LiveServer, idp: TestIdP) -> None:
    token = minted_token(server, idp, CODE_SEARCH)

    claims = verified(server, token, CODE_SEARCH)

    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    assert claims["aud"] == CODE_SEARCH
    assert claims["iss"] == SIDECAR_ISSUER
    assert claims["sub"] == "alice@example.com"


def test_jwks_names_the_key_that_signed(server: LiveServer, idp: TestIdP) -> None:
    token = minted_token(server, idp, CODE_SEARCH)

    jwks = jwks_client(server.url)
    published = {key.key_id: key for key in jwks.get_signing_keys()}

    kid = jwt.get_unverified_header(token)["kid"]
    assert kid in published
    assert published[kid].algorithm_name == "ES256"
    for raw in jwks.fetch_data()["keys"]:  # public halves only
        assert "d" not in raw


def test_token_for_one_audience_fails_verification_for_another(
    server: LiveServer, idp: TestIdP
) -> None:
    token = minted_token(server, idp, TICKETS)

    with pytest.raises(jwt.InvalidAudienceError):
        verified(server, token, CODE_SEARCH)


def test_token_fails_verification_for_another_issuer(server: LiveServer, idp: TestIdP) -> None:
    token = minted_token(server, idp, CODE_SEARCH)
    jwks = jwks_client(server.url)

    with pytest.raises(jwt.InvalidIssuerError):
        jwt.decode(
            token,
            jwks.get_signing_key_from_jwt(token),
            algorithms=["ES256"],
            audience=CODE_SEARCH,
            issuer=idp.issuer,
        )
