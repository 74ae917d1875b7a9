"""Authlib's ``OAuth2Session.fetch_token`` performing a token exchange, with each client
authentication method the token endpoint supports."""

from __future__ import annotations

import time
from typing import Any

import pytest
from authlib.integrations.requests_client import OAuth2Session, OAuthError
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from cryptography.hazmat.primitives import serialization
from joserfc.jwk import ECKey

from tests.conftest import (
    ACCESS_TOKEN_TYPE,
    GATEWAY_SECRET,
    SIDECAR_ISSUER,
    ClientKeys,
    LiveServer,
    TestIdP,
    exchange_params,
)
from tests.functional.http.helpers import jwks_client, verify_as_upstream

# The configured token endpoint: what an assertion's `aud` names (the live server's own URL
# differs from the configured issuer, so it is set explicitly rather than taken from the URL).
TOKEN_ENDPOINT = SIDECAR_ISSUER + "/token"


def exchange(session: OAuth2Session, server: LiveServer, subject_token: str) -> Any:
    return session.fetch_token(server.token_url, **exchange_params(subject_token))


def verified_claims(server: LiveServer, access_token: str) -> dict[str, Any]:
    return verify_as_upstream(jwks_client(server.url), access_token)


def private_key_jwt_session(client_keys: ClientKeys, *, audience: str | None) -> OAuth2Session:
    pem = client_keys.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Authlib's assertions live an hour by default; ours accept at most five minutes.
    auth = PrivateKeyJWT(
        token_endpoint=audience,
        claims={"exp": int(time.time()) + 60},
        headers={"kid": "client-1"},
        alg="ES256",
    )
    session = OAuth2Session(
        client_id=client_keys.client_id,
        client_secret=ECKey.import_key(pem),
        token_endpoint_auth_method="private_key_jwt",
    )
    session.register_client_auth_method(auth)
    return session


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_authlib_session_exchanges_with_a_client_secret(
    server: LiveServer, idp: TestIdP, method: str
) -> None:
    session = OAuth2Session(
        client_id="gateway", client_secret=GATEWAY_SECRET, token_endpoint_auth_method=method
    )

    token = exchange(session, server, idp.token())

    assert token["token_type"] == "Bearer"
    assert token["issued_token_type"] == ACCESS_TOKEN_TYPE
    assert token["scope"] == "code.read"
    claims = verified_claims(server, token["access_token"])
    assert claims["client_id"] == "gateway"
    assert claims["sub"] == "alice@example.com"


@pytest.mark.parametrize("audience", [TOKEN_ENDPOINT, SIDECAR_ISSUER])
def test_authlib_session_exchanges_with_private_key_jwt(
    server: LiveServer, idp: TestIdP, client_keys: ClientKeys, audience: str
) -> None:
    session = private_key_jwt_session(client_keys, audience=audience)

    token = exchange(session, server, idp.token())

    claims = verified_claims(server, token["access_token"])
    assert claims["client_id"] == client_keys.client_id
    assert claims["act"] == {"sub": client_keys.client_id}


def test_authlib_assertion_addressed_to_another_server_is_invalid_client(
    server: LiveServer, idp: TestIdP, client_keys: ClientKeys
) -> None:
    # Without an explicit audience Authlib addresses the assertion to the URL it posts to,
    # which is not this service's configured issuer or token endpoint.
    session = private_key_jwt_session(client_keys, audience=None)

    with pytest.raises(OAuthError) as refused:
        exchange(session, server, idp.token())

    assert refused.value.error == "invalid_client"


def test_authlib_session_with_a_wrong_secret_is_invalid_client(
    server: LiveServer, idp: TestIdP
) -> None:
    session = OAuth2Session(client_id="gateway", client_secret="wrong-secret-" + "z" * 20)
    subject = idp.token()

    with pytest.raises(OAuthError) as refused:
        exchange(session, server, subject)

    assert refused.value.error == "invalid_client"
    assert subject not in str(refused.value.description)
