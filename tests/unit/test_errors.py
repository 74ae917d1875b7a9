"""The OAuth protocol errors (``sidecar/errors.py``): one class per ``error`` code, each with its
HTTP status, a fixed description and its own response headers.

- RFC 6749 §5.2: ``invalid_request``, ``invalid_client`` (401; ``WWW-Authenticate`` "matching
  the authentication scheme used by the client" when it used the Authorization header),
  ``unauthorized_client``, ``unsupported_grant_type``, ``invalid_scope``; the
  ``error_description`` character set (%x20-21 / %x23-5B / %x5D-7E);
- RFC 8693 §2.2.2 and RFC 8707 §2: ``invalid_target``;
- RFC 6749 §4.1.2.1: ``server_error`` and ``temporarily_unavailable`` (503, here with
  ``Retry-After``, RFC 9110 §10.2.3), and RFC 6585 §4: 429 Too Many Requests;
- RFC 7617 §2 / §2.1: the Basic challenge (``realm``, ``charset="UTF-8"``).

RFC 6750's bearer-token errors (``invalid_token``, ``insufficient_scope``) have no class here:
the token endpoint never answers them (the admin API writes its own ``invalid_token``).
"""

from __future__ import annotations

import re

import pytest
from authlib.oauth2.base import OAuth2Error
from authlib.oauth2.rfc6749 import errors as rfc6749

from sidecar.errors import (
    InvalidClientError,
    InvalidRequestError,
    InvalidScopeError,
    InvalidTargetError,
    ProtocolError,
    RateLimitedError,
    ServerError,
    TemporarilyUnavailableError,
    UnauthorizedClientError,
    UnsupportedGrantTypeError,
)

EVERY_ERROR: list[tuple[type[ProtocolError], str, int]] = [
    (InvalidRequestError, "invalid_request", 400),
    (InvalidClientError, "invalid_client", 401),
    (UnauthorizedClientError, "unauthorized_client", 400),
    (UnsupportedGrantTypeError, "unsupported_grant_type", 400),
    (InvalidScopeError, "invalid_scope", 400),
    (InvalidTargetError, "invalid_target", 400),
    (TemporarilyUnavailableError, "temporarily_unavailable", 503),
    (ServerError, "server_error", 500),
    (RateLimitedError, "temporarily_unavailable", 429),
]
# RFC 6749 §5.2: error_description = 1*( %x20-21 / %x23-5B / %x5D-7E )
DESCRIPTION_CHARACTERS = re.compile(r"^[\x20\x21\x23-\x5b\x5d-\x7e]+$")


def ids(case: tuple[type[ProtocolError], str, int]) -> str:
    return case[0].__name__


@pytest.mark.parametrize(("cls", "error", "status"), EVERY_ERROR, ids=[ids(c) for c in EVERY_ERROR])
def test_each_class_has_its_error_code_and_status(
    cls: type[ProtocolError], error: str, status: int
) -> None:
    raised = cls()

    assert (raised.error, raised.status_code) == (error, status)
    assert (cls.error, cls.status_code) == (error, status)  # class attributes, not per instance


@pytest.mark.parametrize(
    "cls", [case[0] for case in EVERY_ERROR], ids=[ids(c) for c in EVERY_ERROR]
)
def test_each_class_is_a_protocol_error_and_an_authlib_error(cls: type[ProtocolError]) -> None:
    assert issubclass(cls, ProtocolError)
    assert issubclass(cls, OAuth2Error)


@pytest.mark.parametrize(
    ("ours", "authlibs"),
    [
        (InvalidRequestError, rfc6749.InvalidRequestError),
        (InvalidClientError, rfc6749.InvalidClientError),
        (UnauthorizedClientError, rfc6749.UnauthorizedClientError),
        (InvalidScopeError, rfc6749.InvalidScopeError),
    ],
)
def test_the_rfc6749_classes_are_also_authlibs_own(
    ours: type[ProtocolError], authlibs: type[OAuth2Error]
) -> None:
    # So that code catching Authlib's class catches ours too.
    assert issubclass(ours, authlibs)
    assert ours().error == authlibs.error


def test_the_error_codes_are_those_the_rfcs_define() -> None:
    defined = {
        # RFC 6749 §5.2
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        # RFC 8693 §2.2.2 (RFC 8707 §2)
        "invalid_target",
        # RFC 6749 §4.1.2.1
        "server_error",
        "temporarily_unavailable",
    }

    assert {error for _, error, _ in EVERY_ERROR} <= defined


@pytest.mark.parametrize(
    "cls", [case[0] for case in EVERY_ERROR], ids=[ids(c) for c in EVERY_ERROR]
)
def test_each_default_description_is_fixed_and_in_the_rfc6749_character_set(
    cls: type[ProtocolError],
) -> None:
    raised = cls()

    assert raised.description == cls.description
    assert DESCRIPTION_CHARACTERS.match(raised.description)


def test_the_reason_is_kept_apart_from_the_description() -> None:
    raised = InvalidRequestError(reason="subject token kid 'x' is unknown to its issuer")

    assert raised.description == "The request is malformed."
    assert raised.reason == "subject token kid 'x' is unknown to its issuer"
    assert "unknown" not in str(raised)


def test_without_a_reason_the_reason_is_the_description() -> None:
    assert InvalidScopeError().reason == InvalidScopeError.description


def test_a_given_description_replaces_the_default() -> None:
    raised = InvalidRequestError("A required parameter is missing.", reason="missing audience")

    assert (raised.description, raised.reason) == (
        "A required parameter is missing.",
        "missing audience",
    )


def test_a_description_outside_the_rfc6749_character_set_cannot_be_built() -> None:
    # Authlib refuses it: a description quoting input with '"' or '\\' cannot reach a client.
    with pytest.raises(ValueError, match="forbidden characters"):
        InvalidRequestError('parameter "audience" is bad')


# --- response headers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raised",
    [
        InvalidRequestError(),
        UnauthorizedClientError(),
        UnsupportedGrantTypeError(),
        InvalidScopeError(),
        InvalidTargetError(),
        ServerError(),
    ],
    ids=lambda raised: type(raised).__name__,
)
def test_most_errors_add_no_response_headers(raised: ProtocolError) -> None:
    assert raised.response_headers() == {}


def test_invalid_client_after_basic_carries_a_basic_challenge() -> None:
    headers = InvalidClientError(basic=True).response_headers()

    assert headers == {"WWW-Authenticate": 'Basic realm="token-exchange-sidecar", charset="UTF-8"'}


def test_invalid_client_without_basic_carries_no_challenge() -> None:
    # RFC 6749 §5.2 asks for the header only when the client used the Authorization header.
    assert InvalidClientError().response_headers() == {}
    assert InvalidClientError(basic=False).status_code == 401


def test_the_challenge_names_no_error_detail() -> None:
    header = InvalidClientError(reason="secret mismatch", basic=True).response_headers()

    assert "mismatch" not in header["WWW-Authenticate"]
    assert "error" not in header["WWW-Authenticate"]


def test_temporarily_unavailable_says_when_to_retry() -> None:
    assert TemporarilyUnavailableError().response_headers() == {"Retry-After": "5"}
    assert TemporarilyUnavailableError(retry_after=30).response_headers() == {"Retry-After": "30"}


def test_rate_limited_is_429_temporarily_unavailable_with_retry_after() -> None:
    raised = RateLimitedError(reason="rate limit", retry_after=2)

    assert isinstance(raised, TemporarilyUnavailableError)
    assert (raised.status_code, raised.error) == (429, "temporarily_unavailable")
    assert raised.description == "Too many requests."
    assert raised.response_headers() == {"Retry-After": "2"}
