"""POST /token answers a malformed request with 400 ``invalid_request`` (RFC 6749 §5.2, RFC 8693
§2.2.2), over real HTTP: missing, repeated, empty or malformed parameters, unsupported token types,
bad subject or actor tokens, and bodies that are not a small, clean form. Each HTTP test runs on
the in-process server and on ``sidecar serve`` (``gateway`` in tests/conftest.py)."""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any
from urllib.parse import urlencode

import jwt
import pytest
import requests

from sidecar.services import Services
from sidecar.web.app import create_app
from tests.conftest import (
    ACCESS_TOKEN_TYPE,
    CODE_SEARCH,
    GATEWAY_SECRET,
    JWT_TOKEN_TYPE,
    TOKEN_EXCHANGE,
    ConfigEdit,
    Gateway,
    TestIdP,
)
from tests.functional.http.helpers import assert_oauth_error, exchange_form, post_token

ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
REPLICA = "https://code-search-replica.internal/mcp"


def with_replica(config: dict[str, Any]) -> dict[str, Any]:
    # A second upstream with the same scopes, so that one request may name two targets.
    config["policies"].append(
        {
            "client_id": "gateway",
            "audience": REPLICA,
            "scopes": ["code.read", "code.search"],
            "default_scopes": ["code.read"],
            "ttl": 120,
        }
    )
    return config


@pytest.fixture(scope="module")
def edit_config() -> ConfigEdit:
    return with_replica


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


# --- missing parameters ------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["grant_type", "subject_token", "subject_token_type"])
def test_a_missing_required_parameter_is_invalid_request(gateway: Gateway, missing: str) -> None:
    subject = gateway.idp.token()
    response = post_token(gateway, exchange_form(subject, **{missing: None}))
    body = assert_oauth_error(response, 400, "invalid_request", subject)
    assert body["error_description"] == "A required parameter is missing."


def test_a_request_naming_no_audience_or_resource_is_invalid_request(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    response = post_token(gateway, exchange_form(subject, audience=None))
    assert_oauth_error(response, 400, "invalid_request", subject)


# --- repeated parameters -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "second"),
    [
        ("scope", "code.search"),
        ("subject_token", "second-token"),
        ("grant_type", TOKEN_EXCHANGE),
        ("subject_token_type", JWT_TOKEN_TYPE),
        ("requested_token_type", ACCESS_TOKEN_TYPE),
        ("client_id", "gateway"),
    ],
)
def test_a_repeated_parameter_is_invalid_request(gateway: Gateway, name: str, second: str) -> None:
    subject = gateway.idp.token()
    form = exchange_form(
        subject, scope="code.read", requested_token_type=ACCESS_TOKEN_TYPE, client_id="gateway"
    )
    form.append((name, second))
    response = post_token(gateway, form)
    body = assert_oauth_error(response, 400, "invalid_request", subject, "second-token")
    assert body["error_description"] == "A parameter is included more than once."


def test_a_repeated_client_secret_is_invalid_request(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    form = exchange_form(subject, client_id="gateway", client_secret=GATEWAY_SECRET)
    form.append(("client_secret", GATEWAY_SECRET))
    response = post_token(gateway, form, auth=None)
    assert_oauth_error(response, 400, "invalid_request", subject)


def test_audience_may_repeat(gateway: Gateway) -> None:
    form = exchange_form(gateway.idp.token())
    form.append(("audience", CODE_SEARCH))
    response = post_token(gateway, form)
    assert response.status_code == 200, response.text


def test_resource_may_repeat_and_join_the_audiences(gateway: Gateway) -> None:
    form = exchange_form(gateway.idp.token(), audience=None)
    form += [("resource", CODE_SEARCH), ("resource", REPLICA), ("audience", CODE_SEARCH)]
    response = post_token(gateway, form)
    assert response.status_code == 200, response.text
    claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    assert claims["aud"] == [CODE_SEARCH, REPLICA]


# --- token types -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "token_type",
    [
        ID_TOKEN_TYPE,
        "urn:ietf:params:oauth:token-type:refresh_token",
        "urn:ietf:params:oauth:token-type:saml2",
        "urn:example:made-up",
    ],
)
def test_an_unsupported_subject_token_type_is_invalid_request(
    gateway: Gateway, token_type: str
) -> None:
    subject = gateway.idp.token()
    response = gateway.exchange(subject, subject_token_type=token_type)
    body = assert_oauth_error(response, 400, "invalid_request", subject, token_type)
    assert body["error_description"] == "The token type is not supported."


def test_an_unsupported_requested_token_type_is_invalid_request(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    response = gateway.exchange(
        subject, requested_token_type="urn:ietf:params:oauth:token-type:refresh_token"
    )
    assert_oauth_error(response, 400, "invalid_request", subject)


# --- bad subject tokens ------------------------------------------------------------------------


def _expired(idp: TestIdP) -> str:
    now = int(time.time())
    return idp.token(iat=now - 7200, exp=now - 3600)


def _wrong_issuer(idp: TestIdP) -> str:
    return idp.token(iss="https://idp.attacker.example")


def _bad_signature(idp: TestIdP) -> str:
    # A genuine signature over a different payload: the claims were altered after signing.
    header, _, signature = idp.token(sub="alice@example.com").split(".")
    forged_payload = idp.token(sub="mallory@example.com").split(".")[1]
    return f"{header}.{forged_payload}.{signature}"


def _alg_none(idp: TestIdP) -> str:
    now = int(time.time())
    header = {"alg": "none", "typ": "JWT", "kid": "rsa-1"}
    claims = {"iss": idp.issuer, "sub": "alice", "aud": idp.audience, "iat": now, "exp": now + 600}
    return f"{_b64(header)}.{_b64(claims)}."


def _foreign_audience(idp: TestIdP) -> str:
    return idp.token(aud="https://another-gateway.example")


def _id_token(idp: TestIdP) -> str:
    return idp.token(nonce="n-0S6_WzA2Mj", aud=idp.audience)


def _not_a_jwt(idp: TestIdP) -> str:
    return "opaque-reference-token-abcdef"


@pytest.mark.parametrize(
    "make_token",
    [
        _expired,
        _wrong_issuer,
        _bad_signature,
        _alg_none,
        _foreign_audience,
        _id_token,
        _not_a_jwt,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_a_bad_subject_token_is_invalid_request(gateway: Gateway, make_token: Any) -> None:
    subject = make_token(gateway.idp)
    response = gateway.exchange(subject)
    body = assert_oauth_error(response, 400, "invalid_request", subject)
    assert body["error_description"] == "The token is invalid."


# --- actor tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_actor", [_expired, _bad_signature, _not_a_jwt], ids=lambda f: f.__name__.strip("_")
)
def test_a_bad_actor_token_is_invalid_request(gateway: Gateway, make_actor: Any) -> None:
    subject, actor = gateway.idp.token(), make_actor(gateway.idp)
    response = gateway.exchange(subject, actor_token=actor, actor_token_type=ACCESS_TOKEN_TYPE)
    body = assert_oauth_error(response, 400, "invalid_request", subject, actor)
    assert body["error_description"] == "The token is invalid."


def test_an_actor_token_without_its_type_is_invalid_request(gateway: Gateway) -> None:
    subject, actor = gateway.idp.token(), gateway.idp.token(sub="agent-7")
    response = gateway.exchange(subject, actor_token=actor)
    assert_oauth_error(response, 400, "invalid_request", subject, actor)


def test_an_actor_token_type_without_an_actor_token_is_invalid_request(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    response = gateway.exchange(subject, actor_token_type=ACCESS_TOKEN_TYPE)
    assert_oauth_error(response, 400, "invalid_request", subject)


def test_a_good_actor_token_is_accepted(gateway: Gateway) -> None:
    # The counterpart of the refusals above: the same form with a valid actor token succeeds.
    subject, actor = gateway.idp.token(), gateway.idp.token(sub="agent-7")
    response = gateway.exchange(subject, actor_token=actor, actor_token_type=JWT_TOKEN_TYPE)
    assert response.status_code == 200, response.text


# --- transport: where and how the parameters arrive -------------------------------------------


def test_parameters_in_the_query_string_are_invalid_request(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    url = f"{gateway.token_url}?{urlencode({'subject_token': subject})}"
    response = post_token(gateway, exchange_form(subject), url=url)
    assert_oauth_error(response, 400, "invalid_request", subject)


def test_a_harmless_query_string_is_refused_too(gateway: Gateway) -> None:
    # The body alone is complete and valid; only the query string is wrong.
    subject = gateway.idp.token()
    response = post_token(gateway, exchange_form(subject), url=f"{gateway.token_url}?debug=1")
    assert_oauth_error(response, 400, "invalid_request", subject)


def test_a_json_body_is_invalid_request(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    response = requests.post(
        gateway.token_url,
        json=dict(exchange_form(subject)),
        auth=("gateway", GATEWAY_SECRET),
        timeout=10,
    )
    assert_oauth_error(response, 400, "invalid_request", subject)


def test_a_multipart_body_is_invalid_request(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    response = requests.post(
        gateway.token_url,
        files={name: (None, value) for name, value in exchange_form(subject)},
        auth=("gateway", GATEWAY_SECRET),
        timeout=10,
    )
    assert response.request.headers["Content-Type"].startswith("multipart/form-data")
    assert_oauth_error(response, 400, "invalid_request", subject)


def test_a_text_plain_body_is_invalid_request(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    response = post_token(
        gateway, urlencode(exchange_form(subject)), headers={"Content-Type": "text/plain"}
    )
    assert_oauth_error(response, 400, "invalid_request", subject)


def test_a_form_with_a_charset_parameter_is_accepted(gateway: Gateway) -> None:
    response = post_token(
        gateway,
        urlencode(exchange_form(gateway.idp.token())),
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=UTF-8"},
    )
    assert response.status_code == 200, response.text


def test_a_body_over_64_kib_is_invalid_request(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    body = urlencode([*exchange_form(subject), ("padding", "p" * (64 * 1024))])
    assert len(body) > 64 * 1024
    response = post_token(
        gateway, body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert_oauth_error(response, 400, "invalid_request", subject)


def test_a_body_without_a_length_is_invalid_request(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    chunks = iter([urlencode(exchange_form(subject)).encode()])  # sent chunked: no Content-Length
    response = post_token(
        gateway, chunks, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.request.headers.get("Transfer-Encoding") == "chunked"
    assert_oauth_error(response, 400, "invalid_request", subject)


def test_more_parameters_than_the_cap_is_invalid_request(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    form = exchange_form(subject) + [("audience", CODE_SEARCH)] * 40
    response = post_token(gateway, form)
    assert_oauth_error(response, 400, "invalid_request", subject)


# --- parameter values --------------------------------------------------------------------------


@pytest.mark.parametrize("character", ["\x00", "\r", "\n"], ids=["NUL", "CR", "LF"])
@pytest.mark.parametrize("name", ["subject_token", "audience", "scope"])
def test_a_control_character_in_a_parameter_is_invalid_request(
    gateway: Gateway, character: str, name: str
) -> None:
    subject = gateway.idp.token()
    values = {"subject_token": subject, "audience": CODE_SEARCH, "scope": "code.read"}
    tainted = values[name][:10] + character + values[name][10:]
    response = post_token(gateway, exchange_form(subject, **{**values, name: tainted}))
    assert_oauth_error(response, 400, "invalid_request", subject, tainted)


@pytest.mark.parametrize(
    "raw", [b"&scope=%FF%FE", b"&scope=caf%C3", b"&scope=\xc3\xa9", b"&scope=\xff"]
)
def test_invalid_utf8_or_raw_non_ascii_is_invalid_request(gateway: Gateway, raw: bytes) -> None:
    subject = gateway.idp.token()
    body = urlencode(exchange_form(subject)).encode() + raw
    response = post_token(
        gateway, body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert_oauth_error(response, 400, "invalid_request", subject)


@pytest.mark.parametrize(
    "name", ["grant_type", "subject_token", "subject_token_type", "audience", "scope"]
)
def test_an_empty_value_is_invalid_request(gateway: Gateway, name: str) -> None:
    subject = gateway.idp.token()
    response = post_token(gateway, exchange_form(subject, **{name: ""}))
    body = assert_oauth_error(response, 400, "invalid_request", subject)
    assert body["error_description"] == "A parameter has an empty value."


def test_a_malformed_form_is_invalid_request(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    body = urlencode(exchange_form(subject)) + "&novalue&&"
    response = post_token(
        gateway, body, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert_oauth_error(response, 400, "invalid_request", subject)


# --- client authentication methods -------------------------------------------------------------


def test_basic_and_client_secret_post_at_once_is_invalid_request(gateway: Gateway) -> None:
    # RFC 6749 §2.3: a client "MUST NOT use more than one authentication method in each request".
    subject = gateway.idp.token()
    form = exchange_form(subject, client_id="gateway", client_secret=GATEWAY_SECRET)
    response = post_token(gateway, form, auth=("gateway", GATEWAY_SECRET))
    assert_oauth_error(response, 400, "invalid_request", subject)


def test_basic_and_a_client_assertion_at_once_is_invalid_request(gateway: Gateway) -> None:
    subject, assertion = gateway.idp.token(), gateway.client_keys.assertion()
    form = exchange_form(
        subject,
        client_assertion_type="urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        client_assertion=assertion,
    )
    response = post_token(gateway, form, auth=("gateway", GATEWAY_SECRET))
    assert_oauth_error(response, 400, "invalid_request", subject, assertion)


@pytest.mark.parametrize(
    "length", ["9" * 5000, "99999999", "+5", " 5", "5 ", "\u0665"]
)  # the last: ARABIC-INDIC DIGIT FIVE
def test_a_content_length_that_is_not_a_small_decimal_is_invalid_request(
    services: Services, length: str
) -> None:
    # Straight through the WSGI app: gunicorn and werkzeug refuse some of these themselves, other
    # servers may pass them on. A 5,000-digit value must not reach int() (Python refuses to
    # convert it, which would be a 500).
    app = create_app(services.settings, services)
    body = b"grant_type=x"
    answers: list[str] = []
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/token",
        "QUERY_STRING": "",
        "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "CONTENT_LENGTH": length,
        "wsgi.input": io.BytesIO(body),
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "80",
        "wsgi.url_scheme": "http",
    }
    payload = b"".join(app(environ, lambda status, headers, exc_info=None: answers.append(status)))
    assert answers == ["400 Bad Request"]
    assert json.loads(payload)["error"] == "invalid_request"
