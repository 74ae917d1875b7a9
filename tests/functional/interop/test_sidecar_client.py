"""The gateway client this project ships (``sidecar.client.TokenExchangeClient``) against the token
endpoint of a real ``sidecar serve`` (``served_gateway`` in tests/conftest.py, started once for the
module): the credential it returns verifies as the upstream's token, a repeat comes from its
cache, and each refusal arrives as its typed exception with nothing secret in it."""

from __future__ import annotations

from collections.abc import Iterator

import jwt
import pytest

from sidecar.client import (
    ExchangeError,
    InvalidClient,
    InvalidScope,
    InvalidTarget,
    TokenExchangeClient,
)
from tests.conftest import CODE_SEARCH, GATEWAY_SECRET, ServedGateway
from tests.functional.http.helpers import jwks_client, verify_as_upstream

WRONG_SECRET = "wrong-secret-" + "z" * 20


@pytest.fixture
def client(served_gateway: ServedGateway) -> Iterator[TokenExchangeClient]:
    # A generous timeout: the first exchange under ``sidecar serve`` may meet a cold worker.
    with TokenExchangeClient(
        served_gateway.token_url, "gateway", GATEWAY_SECRET, timeout=10
    ) as built:
        yield built


def assert_no_secret_in(refusal: ExchangeError, *values: str) -> None:
    for value in (GATEWAY_SECRET, WRONG_SECRET, *values):
        assert value not in str(refusal)
        assert value not in repr(refusal)


def test_an_exchange_returns_a_bearer_credential_for_the_upstream(
    served_gateway: ServedGateway, client: TokenExchangeClient
) -> None:
    credential = client.exchange(
        served_gateway.idp.token(), CODE_SEARCH, scope="code.search code.read"
    )

    assert credential.token_type == "Bearer"
    assert credential.expires_in == 120
    assert credential.scope == "code.read code.search"
    assert credential.headers() == {"Authorization": f"Bearer {credential.access_token}"}
    claims = verify_as_upstream(jwks_client(served_gateway.url), credential.access_token)
    assert claims["sub"] == "alice@example.com"
    assert claims["aud"] == CODE_SEARCH
    assert claims["client_id"] == "gateway"
    assert claims["scope"] == "code.read code.search"


def test_a_repeated_exchange_is_served_from_the_cache(
    served_gateway: ServedGateway, client: TokenExchangeClient
) -> None:
    subject = served_gateway.idp.token()

    first = client.exchange(subject, CODE_SEARCH, scope="code.read")
    second = client.exchange(subject, CODE_SEARCH, scope=["code.read"])

    assert second.access_token == first.access_token
    first_jti = jwt.decode(first.access_token, options={"verify_signature": False})["jti"]
    second_jti = jwt.decode(second.access_token, options={"verify_signature": False})["jti"]
    assert second_jti == first_jti
    # A different scope is a different exchange: the endpoint mints a new token.
    other = client.exchange(subject, CODE_SEARCH, scope="code.search")
    assert (
        verify_as_upstream(jwks_client(served_gateway.url), other.access_token)["jti"] != first_jti
    )


def test_an_audience_without_a_policy_is_invalid_target(
    served_gateway: ServedGateway, client: TokenExchangeClient
) -> None:
    subject = served_gateway.idp.token()

    with pytest.raises(InvalidTarget) as refused:
        client.exchange(subject, "https://no-policy.internal/mcp")

    assert refused.value.status == 400
    assert_no_secret_in(refused.value, subject)


def test_a_wrong_secret_is_invalid_client(served_gateway: ServedGateway) -> None:
    subject = served_gateway.idp.token()
    client = TokenExchangeClient(served_gateway.token_url, "gateway", WRONG_SECRET, timeout=10)

    with client, pytest.raises(InvalidClient) as refused:
        client.exchange(subject, CODE_SEARCH)

    assert refused.value.status == 401
    assert_no_secret_in(refused.value, subject)


def test_a_scope_outside_the_policy_is_invalid_scope(
    served_gateway: ServedGateway, client: TokenExchangeClient
) -> None:
    subject = served_gateway.idp.token()

    with pytest.raises(InvalidScope) as refused:
        client.exchange(subject, CODE_SEARCH, scope="tickets.read")

    assert refused.value.status == 400
    assert refused.value.description == "The requested scope is not allowed."
    assert_no_secret_in(refused.value, subject)
