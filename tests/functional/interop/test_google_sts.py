"""google-auth's RFC 8693 client (``google.oauth2.sts.Client``) against the live token endpoint."""

from __future__ import annotations

import pytest
from google.auth import exceptions
from google.auth.transport.requests import Request
from google.oauth2 import sts, utils

from tests.conftest import (
    ACCESS_TOKEN_TYPE,
    CODE_SEARCH,
    GATEWAY_SECRET,
    TOKEN_EXCHANGE,
    LiveServer,
    TestIdP,
)
from tests.functional.http.helpers import jwks_client, verify_as_upstream


def sts_client(server: LiveServer, auth_type: utils.ClientAuthType) -> sts.Client:
    authentication = utils.ClientAuthentication(auth_type, "gateway", GATEWAY_SECRET)
    return sts.Client(server.token_url, authentication)


@pytest.mark.parametrize(
    "auth_type", [utils.ClientAuthType.basic, utils.ClientAuthType.request_body]
)
def test_google_sts_client_exchanges_a_subject_token(
    server: LiveServer, idp: TestIdP, auth_type: utils.ClientAuthType
) -> None:
    subject = idp.token()

    response = sts_client(server, auth_type).exchange_token(
        Request(),
        grant_type=TOKEN_EXCHANGE,
        subject_token=subject,
        subject_token_type=ACCESS_TOKEN_TYPE,
        audience=CODE_SEARCH,
        scopes=["code.read", "code.search"],
    )

    assert response["issued_token_type"] == ACCESS_TOKEN_TYPE
    assert response["token_type"] == "Bearer"
    assert response["expires_in"] == 120
    assert response["scope"] == "code.read code.search"
    claims = verify_as_upstream(jwks_client(server.url), response["access_token"])
    assert claims["sub"] == "alice@example.com"
    assert claims["client_id"] == "gateway"
    assert claims["scope"] == "code.read code.search"


def test_google_sts_client_surfaces_a_refusal_as_oauth_error(
    server: LiveServer, idp: TestIdP
) -> None:
    subject = idp.token()

    with pytest.raises(exceptions.OAuthError) as refused:
        sts_client(server, utils.ClientAuthType.basic).exchange_token(
            Request(),
            grant_type=TOKEN_EXCHANGE,
            subject_token=subject,
            subject_token_type=ACCESS_TOKEN_TYPE,
            audience=CODE_SEARCH,
            scopes=["tickets.read"],  # not allowed by the code-search policy
        )

    assert "Error code invalid_scope" in str(refused.value)
    assert subject not in str(refused.value)
    assert GATEWAY_SECRET not in str(refused.value)


def test_google_sts_client_with_a_wrong_secret_gets_invalid_client(
    server: LiveServer, idp: TestIdP
) -> None:
    authentication = utils.ClientAuthentication(
        utils.ClientAuthType.basic, "gateway", "wrong-secret-" + "z" * 20
    )

    with pytest.raises(exceptions.OAuthError) as refused:
        sts.Client(server.token_url, authentication).exchange_token(
            Request(),
            grant_type=TOKEN_EXCHANGE,
            subject_token=idp.token(),
            subject_token_type=ACCESS_TOKEN_TYPE,
            audience=CODE_SEARCH,
        )

    assert "Error code invalid_client" in str(refused.value)
    assert "wrong-secret" not in str(refused.value)
