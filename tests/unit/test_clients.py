"""Client authentication at the token endpoint (``sidecar/clients.py``, ``ClientAuthenticator``),
called directly, with no database and no server: the ``jti`` store is an in-memory replacement
with ``JtiStore.remember``'s contract, and the private_key_jwt client's keys are inline (the
JWKS fetch function given fails the test if it is ever called).

- RFC 6749 §2.3.1: ``client_secret_basic`` (the id and secret form-urlencoded, then Basic) and
  ``client_secret_post``; §2.3: one method per request; §3.2.1: a ``client_id`` parameter names
  the authenticated client;
- RFC 7523 §2.2 and §3: ``private_key_jwt`` assertions (signature by a key of the client, ``iss``
  = ``sub`` = the client, ``aud`` our issuer or token endpoint, ``exp`` required and short, a
  ``jti`` accepted once);
- RFC 6749 §5.2: every failure is ``invalid_client`` (401), with ``WWW-Authenticate`` only when
  the client used the Authorization header; using two methods at once is ``invalid_request``.
  No failure echoes the secret.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, quote_plus

import jwt
import pytest

from sidecar.clients import CLIENT_ASSERTION_TYPE, MAX_ASSERTION_LIFETIME, ClientAuthenticator
from sidecar.config import Settings, settings_from_mapping
from sidecar.errors import (
    InvalidClientError,
    InvalidRequestError,
    ProtocolError,
    TemporarilyUnavailableError,
)
from sidecar.exchange.request import FormParams
from tests.conftest import (
    GATEWAY_SECRET,
    MALFORMED_BASIC_HEADERS,
    SIDECAR_ISSUER,
    ClientKeys,
    FakeClock,
)
from tests.unit.support import InMemoryJtis

# A client whose id and secret hold every character RFC 6749 §2.3.1's form-urlencoding changes.
ODD_CLIENT = "ops:team/1"
ODD_SECRET = "p%ss:w/rd+é&=?-" + "q" * 16
SPACED_SECRET = "correct horse battery staple"
WRONG_SECRET = "not-the-secret-" + "z" * 24


@pytest.fixture
def config(config: dict[str, Any]) -> dict[str, Any]:
    config["clients"].append({"client_id": ODD_CLIENT, "client_secret": ODD_SECRET})
    config["clients"].append({"client_id": "spaced", "client_secret": SPACED_SECRET})
    return config


@pytest.fixture
def clock() -> FakeClock:
    """Whole seconds from the wall clock: joserfc checks an assertion's exp on the wall clock,
    the sidecar its lifetime on this one."""
    return FakeClock(float(int(time.time())))


@pytest.fixture
def jtis() -> InMemoryJtis:
    return InMemoryJtis()


@pytest.fixture
def fetched() -> list[str]:
    return []


@pytest.fixture
def authenticator(
    settings: Settings, jtis: InMemoryJtis, clock: FakeClock, fetched: list[str]
) -> Iterator[ClientAuthenticator]:
    def fetch(url: str, timeout: float) -> Any:
        fetched.append(url)
        raise AssertionError("the client's keys are inline: nothing may be fetched")

    yield ClientAuthenticator(settings, jtis, clock, fetch)  # type: ignore[arg-type]
    assert fetched == []


def form(**params: str) -> FormParams:
    return FormParams({name: [value] for name, value in params.items()})


def basic(client_id: str, secret: str, *, encode: Any = quote) -> str:
    """The Authorization header value of RFC 6749 §2.3.1 (id and secret encoded, then Basic)."""
    credentials = f"{encode(client_id, safe='')}:{encode(secret, safe='')}"
    return "Basic " + base64.b64encode(credentials.encode()).decode()


def assertion_form(assertion: str, **params: str) -> FormParams:
    return form(client_assertion_type=CLIENT_ASSERTION_TYPE, client_assertion=assertion, **params)


def refusal(
    authenticator: ClientAuthenticator, params: FormParams, authorization: str | None
) -> ProtocolError:
    """The protocol error ``authenticate`` raises."""
    with pytest.raises(ProtocolError) as raised:
        authenticator.authenticate(params, authorization)
    return raised.value


def assert_invalid_client(error: ProtocolError, *, basic: bool) -> None:
    """RFC 6749 §5.2: ``invalid_client``, 401, and a Basic challenge only after Basic."""
    assert type(error) is InvalidClientError
    assert (error.error, error.status_code) == ("invalid_client", 401)
    if basic:
        challenge = error.response_headers()["WWW-Authenticate"]
        assert challenge.startswith("Basic realm=")
    else:
        assert error.response_headers() == {}


def refused_assertion(authenticator: ClientAuthenticator, assertion: str) -> ProtocolError:
    """The refusal of a request authenticated by ``assertion`` alone: ``invalid_client``, with no
    Basic challenge."""
    error = refusal(authenticator, assertion_form(assertion), None)
    assert_invalid_client(error, basic=False)
    return error


# --- client_secret_basic -----------------------------------------------------------------------


def test_basic_with_the_right_secret_authenticates(authenticator: ClientAuthenticator) -> None:
    client = authenticator.authenticate(form(), basic("gateway", GATEWAY_SECRET))

    assert client.client_id == "gateway"


def test_basic_credentials_are_percent_decoded_after_base64(
    authenticator: ClientAuthenticator,
) -> None:
    # RFC 6749 §2.3.1: the id and secret are form-urlencoded first, so an id may hold ':'.
    client = authenticator.authenticate(form(), basic(ODD_CLIENT, ODD_SECRET))

    assert client.client_id == ODD_CLIENT


@pytest.mark.xfail(
    strict=True,
    reason=(
        "RFC 6749 §2.3.1 / Appendix B form-urlencoding turns a space into '+', but Authlib's "
        "extract_basic_authorization (authlib/oauth2/rfc6749/util.py) decodes with "
        "urllib.parse.unquote, which keeps '+': a secret with a space, encoded as the RFC says, "
        "never matches (sidecar/ratelimit.py claimed_client_id decodes the same way)"
    ),
)
def test_basic_credentials_form_encoded_with_plus_for_space_authenticate(
    authenticator: ClientAuthenticator,
) -> None:
    client = authenticator.authenticate(form(), basic("spaced", SPACED_SECRET, encode=quote_plus))

    assert client.client_id == "spaced"


def test_basic_with_a_wrong_secret_is_invalid_client_with_a_basic_challenge(
    authenticator: ClientAuthenticator,
) -> None:
    error = refusal(authenticator, form(), basic("gateway", WRONG_SECRET))

    assert_invalid_client(error, basic=True)


def test_an_unknown_client_is_refused_exactly_like_a_wrong_secret(
    authenticator: ClientAuthenticator,
) -> None:
    unknown = refusal(authenticator, form(), basic("ghost", GATEWAY_SECRET))
    wrong = refusal(authenticator, form(), basic("gateway", WRONG_SECRET))

    assert_invalid_client(unknown, basic=True)
    assert (unknown.description, unknown.reason, unknown.response_headers()) == (
        wrong.description,
        wrong.reason,
        wrong.response_headers(),
    )


def test_another_clients_secret_does_not_authenticate(
    authenticator: ClientAuthenticator,
) -> None:
    error = refusal(authenticator, form(), basic(ODD_CLIENT, GATEWAY_SECRET))

    assert_invalid_client(error, basic=True)


@pytest.mark.parametrize("authorization", MALFORMED_BASIC_HEADERS)
def test_a_malformed_basic_header_is_invalid_client_with_a_basic_challenge(
    authenticator: ClientAuthenticator, authorization: str
) -> None:
    error = refusal(authenticator, form(), authorization)

    assert_invalid_client(error, basic=True)


def test_another_authorization_scheme_is_invalid_client_with_a_basic_challenge(
    authenticator: ClientAuthenticator,
) -> None:
    # The client used the Authorization header: 401 with the one scheme this endpoint accepts.
    error = refusal(authenticator, form(), "Bearer some-token")

    assert_invalid_client(error, basic=True)


def test_a_client_id_parameter_naming_the_basic_client_is_accepted(
    authenticator: ClientAuthenticator,
) -> None:
    client = authenticator.authenticate(form(client_id="gateway"), basic("gateway", GATEWAY_SECRET))

    assert client.client_id == "gateway"


def test_a_client_id_parameter_naming_another_client_is_invalid_client(
    authenticator: ClientAuthenticator,
) -> None:
    error = refusal(authenticator, form(client_id="no-exchange"), basic("gateway", GATEWAY_SECRET))

    assert_invalid_client(error, basic=True)
    assert error.reason == "client_id does not match the credentials"


def test_basic_and_client_secret_post_together_are_invalid_request(
    authenticator: ClientAuthenticator,
) -> None:
    params = form(client_id="gateway", client_secret=GATEWAY_SECRET)

    error = refusal(authenticator, params, basic("gateway", GATEWAY_SECRET))

    assert type(error) is InvalidRequestError
    assert (error.error, error.status_code) == ("invalid_request", 400)


# --- client_secret_post ------------------------------------------------------------------------


def test_client_secret_post_with_the_right_secret_authenticates(
    authenticator: ClientAuthenticator,
) -> None:
    client = authenticator.authenticate(
        form(client_id="gateway", client_secret=GATEWAY_SECRET), None
    )

    assert client.client_id == "gateway"


def test_client_secret_post_with_a_wrong_secret_is_invalid_client_without_a_challenge(
    authenticator: ClientAuthenticator,
) -> None:
    error = refusal(authenticator, form(client_id="gateway", client_secret=WRONG_SECRET), None)

    assert_invalid_client(error, basic=False)


def test_client_secret_post_without_a_client_id_is_invalid_client(
    authenticator: ClientAuthenticator,
) -> None:
    error = refusal(authenticator, form(client_secret=GATEWAY_SECRET), None)

    assert_invalid_client(error, basic=False)


def test_a_client_id_alone_is_no_authentication(authenticator: ClientAuthenticator) -> None:
    # Confidential clients only (RFC 6749 §3.2.1): the "none" method is never accepted.
    error = refusal(authenticator, form(client_id="gateway"), None)

    assert_invalid_client(error, basic=False)
    assert error.reason == "no client authentication"


def test_a_key_client_cannot_authenticate_with_a_secret(
    authenticator: ClientAuthenticator, client_keys: ClientKeys
) -> None:
    params = form(client_id=client_keys.client_id, client_secret=GATEWAY_SECRET)

    assert_invalid_client(refusal(authenticator, params, None), basic=False)


# --- private_key_jwt ---------------------------------------------------------------------------


def test_a_valid_assertion_authenticates_and_its_jti_is_remembered(
    authenticator: ClientAuthenticator, client_keys: ClientKeys, jtis: InMemoryJtis
) -> None:
    assertion = client_keys.assertion()
    claims = jwt.decode(assertion, options={"verify_signature": False})

    client = authenticator.authenticate(assertion_form(assertion), None)

    assert client.client_id == client_keys.client_id
    assert jtis.calls == [(client_keys.client_id, claims["jti"], float(claims["exp"]))]


@pytest.mark.parametrize("audience", [SIDECAR_ISSUER, SIDECAR_ISSUER + "/token"])
def test_an_assertion_for_the_issuer_or_the_token_endpoint_is_accepted(
    authenticator: ClientAuthenticator, client_keys: ClientKeys, audience: str
) -> None:
    params = assertion_form(client_keys.assertion(audience=audience))

    assert authenticator.authenticate(params, None).client_id == client_keys.client_id


def test_an_assertion_for_another_audience_is_refused_and_its_jti_not_spent(
    authenticator: ClientAuthenticator, client_keys: ClientKeys, jtis: InMemoryJtis
) -> None:
    params = assertion_form(client_keys.assertion(audience="https://elsewhere.example/token"))

    assert_invalid_client(refusal(authenticator, params, None), basic=False)
    assert jtis.calls == []


def test_a_replayed_assertion_is_refused(
    authenticator: ClientAuthenticator, client_keys: ClientKeys
) -> None:
    params = assertion_form(client_keys.assertion())
    authenticator.authenticate(params, None)

    assert_invalid_client(refusal(authenticator, params, None), basic=False)


def test_a_new_assertion_with_a_used_jti_is_refused(
    authenticator: ClientAuthenticator, client_keys: ClientKeys
) -> None:
    authenticator.authenticate(assertion_form(client_keys.assertion(jti="once")), None)
    again = assertion_form(client_keys.assertion(jti="once", iat=int(time.time()) - 1))

    assert_invalid_client(refusal(authenticator, again, None), basic=False)


def test_an_assertion_without_a_jti_is_refused(
    authenticator: ClientAuthenticator, client_keys: ClientKeys
) -> None:
    claims: dict[str, Any] = {
        "iss": client_keys.client_id,
        "sub": client_keys.client_id,
        "aud": SIDECAR_ISSUER,
        "exp": int(time.time()) + 60,
    }
    assertion = jwt.encode(claims, client_keys.key, algorithm="ES256", headers={"kid": "client-1"})

    refused_assertion(authenticator, assertion)


def test_an_expired_assertion_is_refused(
    authenticator: ClientAuthenticator, client_keys: ClientKeys, clock: FakeClock
) -> None:
    now = int(clock.now)
    assertion = client_keys.assertion(iat=now - 600, exp=now - 300)  # beyond the 30 s leeway

    refused_assertion(authenticator, assertion)


def test_an_assertion_living_longer_than_the_maximum_is_refused(
    authenticator: ClientAuthenticator, client_keys: ClientKeys, clock: FakeClock
) -> None:
    assertion = client_keys.assertion(exp=int(clock.now) + MAX_ASSERTION_LIFETIME + 1)

    error = refused_assertion(authenticator, assertion)

    assert error.reason == "client assertion lifetime too long"


def test_an_assertion_without_exp_is_refused(
    authenticator: ClientAuthenticator, client_keys: ClientKeys
) -> None:
    claims = {
        "iss": client_keys.client_id,
        "sub": client_keys.client_id,
        "aud": SIDECAR_ISSUER,
        "jti": "no-exp",
    }
    assertion = jwt.encode(claims, client_keys.key, algorithm="ES256", headers={"kid": "client-1"})

    error = refused_assertion(authenticator, assertion)

    assert error.reason == "client assertion without numeric exp"


def test_an_assertion_whose_iss_is_not_its_sub_is_refused(
    authenticator: ClientAuthenticator, client_keys: ClientKeys
) -> None:
    assertion = client_keys.assertion(iss="someone-else")

    refused_assertion(authenticator, assertion)


def test_an_assertion_signed_by_another_key_is_refused(
    authenticator: ClientAuthenticator, client_keys: ClientKeys, jtis: InMemoryJtis
) -> None:
    forged = client_keys.impostor_assertion()

    refused_assertion(authenticator, forged)
    assert jtis.calls == []  # the jti is recorded only once the signature verified


def test_an_unsigned_assertion_is_refused(
    authenticator: ClientAuthenticator, client_keys: ClientKeys
) -> None:
    refused_assertion(authenticator, client_keys.unsigned_assertion())


def test_another_client_assertion_type_is_invalid_client(
    authenticator: ClientAuthenticator, client_keys: ClientKeys
) -> None:
    params = form(
        client_assertion_type="urn:ietf:params:oauth:client-assertion-type:saml2-bearer",
        client_assertion=client_keys.assertion(),
    )

    error = refusal(authenticator, params, None)

    assert_invalid_client(error, basic=False)
    assert error.reason == "unsupported client_assertion_type"


def test_a_secret_client_cannot_authenticate_with_an_assertion(
    authenticator: ClientAuthenticator, client_keys: ClientKeys
) -> None:
    # Signed by a key, but naming the secret client: it has no keys to verify it with.
    assertion = client_keys.assertion(iss="gateway", sub="gateway")

    refused_assertion(authenticator, assertion)


def test_an_assertion_and_a_secret_together_are_invalid_request(
    authenticator: ClientAuthenticator, client_keys: ClientKeys
) -> None:
    params = assertion_form(client_keys.assertion(), client_secret=GATEWAY_SECRET)

    assert type(refusal(authenticator, params, None)) is InvalidRequestError


def test_a_client_id_parameter_naming_another_client_than_the_assertion_is_invalid_client(
    authenticator: ClientAuthenticator, client_keys: ClientKeys
) -> None:
    params = assertion_form(client_keys.assertion(), client_id="gateway")

    assert_invalid_client(refusal(authenticator, params, None), basic=False)


def test_a_jti_store_that_is_down_is_temporarily_unavailable_not_invalid_client(
    settings: Settings, clock: FakeClock, client_keys: ClientKeys
) -> None:
    class DownJtis:
        def remember(self, client_id: str, jti: str, expires_at: float) -> bool:
            raise TemporarilyUnavailableError(reason="database unavailable (jti store)")

    authenticator = ClientAuthenticator(settings, DownJtis(), clock)  # type: ignore[arg-type]

    error = refusal(authenticator, assertion_form(client_keys.assertion()), None)

    assert type(error) is TemporarilyUnavailableError
    assert error.status_code == 503


# --- no failure echoes the secret ---------------------------------------------------------------

PRESENTED_SECRET = "presented-secret-" + "s" * 24


@pytest.mark.parametrize(
    ("params", "authorization"),
    [
        ({}, basic("gateway", PRESENTED_SECRET)),
        ({}, basic("ghost", PRESENTED_SECRET)),
        ({"client_id": "gateway", "client_secret": PRESENTED_SECRET}, None),
        ({"client_id": "ghost", "client_secret": PRESENTED_SECRET}, None),
        ({"client_secret": PRESENTED_SECRET}, basic("gateway", GATEWAY_SECRET)),
        ({}, f"Bearer {PRESENTED_SECRET}"),
    ],
    ids=["basic", "basic-unknown", "post", "post-unknown", "two-methods", "bearer"],
)
def test_no_failure_echoes_the_presented_secret(
    authenticator: ClientAuthenticator,
    caplog: pytest.LogCaptureFixture,
    params: dict[str, str],
    authorization: str | None,
) -> None:
    caplog.set_level(logging.DEBUG)

    error = refusal(authenticator, form(**params), authorization)

    chain: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    texts = [str(e) for e in chain] + [repr(e) for e in chain]
    texts += [error.description, error.reason, json.dumps(error.response_headers())]
    texts += [record.getMessage() for record in caplog.records]
    assert not [text for text in texts if PRESENTED_SECRET in text]


def test_settings_are_enough_to_build_the_authenticator_without_a_database(
    config: dict[str, Any], jtis: InMemoryJtis
) -> None:
    # The database URL is never opened: the authenticator only holds the jti store given to it.
    config["database_url"] = "sqlite:////nonexistent/directory/sidecar.db"
    settings = settings_from_mapping(config, env={})

    authenticator = ClientAuthenticator(settings, jtis, time.time)  # type: ignore[arg-type]

    assert authenticator.authenticate(form(), basic("gateway", GATEWAY_SECRET)).client_id == (
        "gateway"
    )
