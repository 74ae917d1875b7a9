"""Client authentication at POST /token over real HTTP (RFC 6749 §2.3, RFC 7523 §2.2/§3):
``client_secret_basic``, ``client_secret_post`` and ``private_key_jwt``; a failure is 401
``invalid_client`` (with ``WWW-Authenticate`` when the Authorization header was used), a client
without the token-exchange grant is 400 ``unauthorized_client``. Each test runs on the in-process
server and on ``sidecar serve`` (``gateway`` in tests/conftest.py), each request on a new
connection (either worker may answer it, a replayed assertion included)."""

from __future__ import annotations

import base64
import time

import jwt
import pytest

from tests.conftest import (
    GATEWAY_SECRET,
    MALFORMED_BASIC_HEADERS,
    OTHER_SECRET,
    SIDECAR_ISSUER,
    ClientKeys,
    Gateway,
)
from tests.functional.http.helpers import (
    assert_oauth_error,
    assertion_form,
    exchange_form,
    post_token,
)

TOKEN_ENDPOINT = SIDECAR_ISSUER + "/token"
WRONG_SECRET = "not-the-secret-" + "z" * 24


def _minted_claims(access_token: str) -> dict[str, object]:
    return jwt.decode(access_token, options={"verify_signature": False})


# --- client_secret_basic -----------------------------------------------------------------------


def test_a_wrong_secret_via_basic_is_401_with_a_basic_challenge(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    response = gateway.exchange(subject, auth=("gateway", WRONG_SECRET))
    assert_oauth_error(response, 401, "invalid_client", subject, WRONG_SECRET)
    assert response.headers["WWW-Authenticate"].startswith("Basic ")


def test_an_unknown_client_via_basic_is_401_with_a_basic_challenge(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    response = gateway.exchange(subject, auth=("ghost-client", GATEWAY_SECRET))
    assert_oauth_error(response, 401, "invalid_client", subject, "ghost-client")
    assert response.headers["WWW-Authenticate"].startswith("Basic ")


def test_another_clients_secret_via_basic_is_401(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    response = gateway.exchange(subject, auth=("gateway", OTHER_SECRET))
    assert_oauth_error(response, 401, "invalid_client", subject)


@pytest.mark.parametrize("authorization", MALFORMED_BASIC_HEADERS)
def test_a_malformed_basic_header_is_401_with_a_basic_challenge(
    gateway: Gateway, authorization: str
) -> None:
    subject = gateway.idp.token()
    response = post_token(
        gateway, exchange_form(subject), auth=None, headers={"Authorization": authorization}
    )
    assert_oauth_error(response, 401, "invalid_client", subject)
    assert response.headers["WWW-Authenticate"].startswith("Basic ")


def test_an_unsupported_authorization_scheme_is_401_with_a_basic_challenge(
    gateway: Gateway,
) -> None:
    # RFC 6749 §5.2: a client that used the Authorization header gets 401 with WWW-Authenticate;
    # Basic is the only scheme this endpoint accepts, so that is the challenge to send.
    subject = gateway.idp.token()
    response = post_token(
        gateway, exchange_form(subject), auth=None, headers={"Authorization": f"Bearer {subject}"}
    )
    assert_oauth_error(response, 401, "invalid_client", subject)
    assert response.headers["WWW-Authenticate"].startswith("Basic ")


def test_no_client_credentials_is_401(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    response = gateway.exchange(subject, auth=None)
    assert_oauth_error(response, 401, "invalid_client", subject)


def test_a_client_id_parameter_naming_another_client_is_401(gateway: Gateway) -> None:
    # RFC 6749 §3.2.1: the client_id parameter, when sent, must identify the authenticated client.
    subject = gateway.idp.token()
    response = gateway.exchange(subject, client_id="no-exchange")
    assert_oauth_error(response, 401, "invalid_client", subject)
    assert response.headers["WWW-Authenticate"].startswith("Basic ")


def test_a_client_id_parameter_naming_the_same_client_is_accepted(gateway: Gateway) -> None:
    response = gateway.exchange(gateway.idp.token(), client_id="gateway")
    assert response.status_code == 200, response.text


def test_a_basic_client_id_and_secret_are_form_urldecoded(gateway: Gateway) -> None:
    # RFC 6749 §2.3.1: the client id and secret are form-urlencoded before Basic encoding.
    encoded = base64.b64encode(f"gateway:{GATEWAY_SECRET}".replace("-", "%2D").encode()).decode()
    response = post_token(
        gateway,
        exchange_form(gateway.idp.token()),
        auth=None,
        headers={"Authorization": f"Basic {encoded}"},
    )
    assert response.status_code == 200, response.text


# --- client_secret_post ------------------------------------------------------------------------


def test_client_secret_post_authenticates(gateway: Gateway) -> None:
    form = exchange_form(gateway.idp.token(), client_id="gateway", client_secret=GATEWAY_SECRET)
    response = post_token(gateway, form, auth=None)
    assert response.status_code == 200, response.text
    assert _minted_claims(response.json()["access_token"])["client_id"] == "gateway"


def test_a_wrong_secret_via_client_secret_post_is_401(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    form = exchange_form(subject, client_id="gateway", client_secret=WRONG_SECRET)
    response = post_token(gateway, form, auth=None)
    assert_oauth_error(response, 401, "invalid_client", subject, WRONG_SECRET)


def test_an_unknown_client_via_client_secret_post_is_401(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    form = exchange_form(subject, client_id="ghost-client", client_secret=GATEWAY_SECRET)
    response = post_token(gateway, form, auth=None)
    assert_oauth_error(response, 401, "invalid_client", subject, "ghost-client")


def test_a_client_secret_without_a_client_id_is_401(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    response = post_token(gateway, exchange_form(subject, client_secret=GATEWAY_SECRET), auth=None)
    assert_oauth_error(response, 401, "invalid_client", subject)


def test_a_secret_for_a_private_key_jwt_client_is_401(gateway: Gateway) -> None:
    # jwt-gateway authenticates with its key only; no secret can stand in for it.
    subject, client_id = gateway.idp.token(), gateway.client_keys.client_id
    form = exchange_form(subject, client_id=client_id, client_secret=GATEWAY_SECRET)
    response = post_token(gateway, form, auth=None)
    assert_oauth_error(response, 401, "invalid_client", subject)


# --- private_key_jwt ---------------------------------------------------------------------------


@pytest.mark.parametrize("audience", [SIDECAR_ISSUER, TOKEN_ENDPOINT], ids=["issuer", "endpoint"])
def test_private_key_jwt_authenticates(gateway: Gateway, audience: str) -> None:
    client_keys = gateway.client_keys
    form = assertion_form(gateway.idp.token(), client_keys.assertion(audience=audience))
    response = post_token(gateway, form, auth=None)
    assert response.status_code == 200, response.text
    assert _minted_claims(response.json()["access_token"])["client_id"] == client_keys.client_id


def test_private_key_jwt_with_a_matching_client_id_parameter_authenticates(
    gateway: Gateway,
) -> None:
    client_keys = gateway.client_keys
    form = assertion_form(
        gateway.idp.token(), client_keys.assertion(), client_id=client_keys.client_id
    )
    response = post_token(gateway, form, auth=None)
    assert response.status_code == 200, response.text


def test_a_replayed_client_assertion_is_401(gateway: Gateway) -> None:
    assertion = gateway.client_keys.assertion()
    first = post_token(gateway, assertion_form(gateway.idp.token(), assertion), auth=None)
    assert first.status_code == 200, first.text

    subject = gateway.idp.token()
    second = post_token(gateway, assertion_form(subject, assertion), auth=None)
    assert_oauth_error(second, 401, "invalid_client", subject, assertion)


def test_a_jti_is_accepted_once_even_in_a_new_assertion(gateway: Gateway) -> None:
    first = post_token(
        gateway,
        assertion_form(gateway.idp.token(), gateway.client_keys.assertion(jti="jti-1")),
        auth=None,
    )
    assert first.status_code == 200, first.text
    again = gateway.client_keys.assertion(jti="jti-1", iat=int(time.time()) + 1)
    subject = gateway.idp.token()
    response = post_token(gateway, assertion_form(subject, again), auth=None)
    assert_oauth_error(response, 401, "invalid_client", subject, again)


def _bad_assertions(client_keys: ClientKeys) -> dict[str, str]:
    now = int(time.time())
    return {
        "bad-signature": client_keys.impostor_assertion(jti="signed-with-another-key"),
        "alg-none": client_keys.unsigned_assertion(),
        "wrong-aud": client_keys.assertion(audience="https://some-other-server.example/token"),
        "expired": client_keys.assertion(iat=now - 3600, exp=now - 1800),
        "exp-too-far": client_keys.assertion(exp=now + 3600),
        "exp-just-over-300s": client_keys.assertion(exp=now + 330),
        "iss-not-sub": client_keys.assertion(iss="gateway"),
        "unknown-sub": client_keys.assertion(iss="ghost-client", sub="ghost-client"),
        "no-exp": jwt.encode(
            {"iss": "jwt-gateway", "sub": "jwt-gateway", "aud": SIDECAR_ISSUER, "jti": "j-noexp"},
            client_keys.key,
            algorithm="ES256",
            headers={"kid": "client-1"},
        ),
        "no-jti": jwt.encode(
            {"iss": "jwt-gateway", "sub": "jwt-gateway", "aud": SIDECAR_ISSUER, "exp": now + 60},
            client_keys.key,
            algorithm="ES256",
            headers={"kid": "client-1"},
        ),
        "not-a-jwt": "not-a-jwt",
    }


@pytest.mark.parametrize(
    "case",
    [
        "bad-signature",
        "alg-none",
        "wrong-aud",
        "expired",
        "exp-too-far",
        "exp-just-over-300s",
        "iss-not-sub",
        "unknown-sub",
        "no-exp",
        "no-jti",
        "not-a-jwt",
    ],
)
def test_a_bad_client_assertion_is_401(gateway: Gateway, case: str) -> None:
    subject, assertion = gateway.idp.token(), _bad_assertions(gateway.client_keys)[case]
    response = post_token(gateway, assertion_form(subject, assertion), auth=None)
    assert_oauth_error(response, 401, "invalid_client", subject, assertion)


def test_a_client_assertion_of_an_unknown_type_is_401(gateway: Gateway) -> None:
    subject, assertion = gateway.idp.token(), gateway.client_keys.assertion()
    form = assertion_form(
        subject,
        assertion,
        client_assertion_type="urn:ietf:params:oauth:client-assertion-type:saml2-bearer",
    )
    response = post_token(gateway, form, auth=None)
    assert_oauth_error(response, 401, "invalid_client", subject, assertion)


def test_a_client_assertion_with_a_client_id_naming_another_client_is_401(gateway: Gateway) -> None:
    subject, assertion = gateway.idp.token(), gateway.client_keys.assertion()
    form = assertion_form(subject, assertion, client_id="gateway")
    response = post_token(gateway, form, auth=None)
    assert_oauth_error(response, 401, "invalid_client", subject, assertion)


def test_a_client_assertion_for_a_secret_client_is_401(gateway: Gateway) -> None:
    # A well-signed assertion naming gateway (a client_secret client) must not authenticate it.
    subject = gateway.idp.token()
    assertion = gateway.client_keys.assertion(iss="gateway", sub="gateway")
    response = post_token(gateway, assertion_form(subject, assertion), auth=None)
    assert_oauth_error(response, 401, "invalid_client", subject, assertion)


# --- unauthorized_client -----------------------------------------------------------------------


def test_a_client_without_the_exchange_grant_is_unauthorized_client(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    response = gateway.exchange(subject, auth=("no-exchange", OTHER_SECRET))
    assert_oauth_error(response, 400, "unauthorized_client", subject)
    assert "WWW-Authenticate" not in response.headers


def test_unauthorized_client_needs_a_correct_secret_first(gateway: Gateway) -> None:
    # Authentication comes before the grant check: a wrong secret says nothing about the grant.
    subject = gateway.idp.token()
    response = gateway.exchange(subject, auth=("no-exchange", WRONG_SECRET))
    assert_oauth_error(response, 401, "invalid_client", subject, WRONG_SECRET)
