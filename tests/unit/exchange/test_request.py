"""Parsing of the token endpoint's form body and of the RFC 8693 §2.1 parameters."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest

from sidecar.errors import InvalidRequestError, InvalidScopeError, InvalidTargetError
from sidecar.exchange.request import (
    ACCESS_TOKEN_TYPE,
    ID_TOKEN_TYPE,
    JWT_TOKEN_TYPE,
    MAX_BODY_BYTES,
    MAX_PARAMETERS,
    MAX_TARGETS,
    MAX_TOKEN_CHARS,
    TOKEN_EXCHANGE_GRANT,
    FormParams,
    TokenExchangeRequest,
    parse_form,
    parse_token_exchange,
)

SAML2_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:saml2"
REFRESH_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:refresh_token"
UPSTREAM = "https://code-search.internal/mcp"


def form(**overrides: str | list[str] | None) -> list[tuple[str, str]]:
    """A valid token-exchange form as pairs; overrides replace (a list repeats, None drops)."""
    fields: dict[str, str | list[str] | None] = {
        "grant_type": TOKEN_EXCHANGE_GRANT,
        "subject_token": "header.payload.signature",
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "audience": UPSTREAM,
    }
    fields.update(overrides)
    pairs = []
    for name, value in fields.items():
        for item in [value] if isinstance(value, str) else value or []:
            pairs.append((name, item))
    return pairs


def body(pairs: list[tuple[str, str]]) -> bytes:
    return urlencode(pairs).encode("ascii")


def exchange(**overrides: str | list[str] | None) -> TokenExchangeRequest:
    return parse_token_exchange(parse_form(body(form(**overrides))))


# --- parse_form ---------------------------------------------------------------------------------


def test_form_parses_names_and_percent_decoded_values() -> None:
    params = parse_form(b"a=1&b=hello+world&c=%C3%A9t%C3%A9&d=x%26y%3Dz")

    assert params.single("a") == "1"
    assert params.single("b") == "hello world"
    assert params.single("c") == "\u00e9t\u00e9"
    assert params.single("d") == "x&y=z"
    assert params.single("missing") is None
    assert "a" in params
    assert "missing" not in params


def test_empty_body_has_no_parameters() -> None:
    assert parse_form(b"").values == {}


def test_non_ascii_body_is_refused() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_form("scope=caf\u00e9".encode())
    assert caught.value.error == "invalid_request"


@pytest.mark.parametrize("raw", [b"a=1&&b=2", b"a", b"a=1&b", b"&", b"a=1&", b"=x"])
def test_malformed_pairs_are_refused_by_strict_parsing(raw: bytes) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_form(raw)
    assert caught.value.error == "invalid_request"


@pytest.mark.parametrize("raw", [b"a=1;b=2"])
def test_semicolon_is_not_a_separator(raw: bytes) -> None:
    # Only "&" separates pairs: a ";" stays inside the value.
    assert parse_form(raw).single("a") == "1;b=2"


@pytest.mark.parametrize("encoded", ["%00", "%0D", "%0A", "%09", "%1F", "%7F"])
def test_control_characters_in_values_are_refused(encoded: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_form(f"scope=a{encoded}b".encode())
    assert caught.value.error == "invalid_request"


@pytest.mark.parametrize("encoded", ["%00", "%0D%0A"])
def test_control_characters_in_names_are_refused(encoded: str) -> None:
    with pytest.raises(InvalidRequestError):
        parse_form(f"sco{encoded}pe=read".encode())


@pytest.mark.parametrize("raw", [b"scope=", b"grant_type=x&scope=", b"audience=a&audience="])
def test_empty_values_are_refused(raw: bytes) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_form(raw)
    assert caught.value.error == "invalid_request"
    assert caught.value.reason == "empty value"


@pytest.mark.parametrize(
    "name",
    [
        "grant_type",
        "subject_token",
        "subject_token_type",
        "scope",
        "requested_token_type",
        "actor_token",
        "actor_token_type",
        "client_id",
        "unknown_extension",
    ],
)
def test_repeated_parameters_are_refused(name: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_form(body([(name, "one"), (name, "two")]))
    assert caught.value.error == "invalid_request"


def test_a_parameter_repeated_with_the_same_value_is_still_refused() -> None:
    with pytest.raises(InvalidRequestError):
        parse_form(b"scope=read&scope=read")


@pytest.mark.parametrize("name", ["audience", "resource"])
def test_audience_and_resource_may_repeat(name: str) -> None:
    params = parse_form(body([(name, "https://a.example"), (name, "https://b.example")]))
    assert params.many(name) == ["https://a.example", "https://b.example"]


def test_body_at_the_size_cap_is_accepted_and_over_it_refused() -> None:
    prefix = b"subject_token="
    at_cap = prefix + b"a" * (MAX_BODY_BYTES - len(prefix))
    assert len(parse_form(at_cap).single("subject_token") or "") == MAX_BODY_BYTES - len(prefix)

    with pytest.raises(InvalidRequestError) as caught:
        parse_form(at_cap + b"a")
    assert caught.value.error == "invalid_request"


def test_parameter_count_is_capped() -> None:
    at_cap = body([(f"p{i}", "v") for i in range(MAX_PARAMETERS)])
    assert len(parse_form(at_cap).values) == MAX_PARAMETERS

    with pytest.raises(InvalidRequestError):
        parse_form(body([(f"p{i}", "v") for i in range(MAX_PARAMETERS + 1)]))


@pytest.mark.parametrize("encoded", ["%C3", "%FF", "%C3%28", "%ED%A0%80"])
def test_invalid_percent_encoded_utf8_is_refused(encoded: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_form(f"scope={encoded}".encode())
    assert caught.value.error == "invalid_request"


@pytest.mark.parametrize("encoded", ["a%00b", "%C3%28"])
def test_a_refused_short_value_is_refused_again_every_time(encoded: str) -> None:
    # Short percent-encoded values are decoded once and remembered; refusals never are.
    for _ in range(3):
        with pytest.raises(InvalidRequestError):
            parse_form(f"scope={encoded}".encode())


def test_short_and_long_percent_encoded_values_decode_alike() -> None:
    short = "https%3A%2F%2Fup.example%2Fmcp"
    long = short + "%2F" + "x" * 400
    for _ in range(2):  # the second time from memory, for the short one
        params = parse_form(f"audience={short}&resource={long}".encode())
        assert params.single("audience") == "https://up.example/mcp"
        assert params.single("resource") == "https://up.example/mcp/" + "x" * 400


# --- parse_token_exchange -----------------------------------------------------------------------


def test_a_minimal_request_is_read_with_its_defaults() -> None:
    request = exchange()

    assert request.subject_token == "header.payload.signature"
    assert request.subject_token_type == ACCESS_TOKEN_TYPE
    assert request.audiences == (UPSTREAM,)
    assert request.resources == ()
    assert request.targets == (UPSTREAM,)
    assert request.scopes is None
    assert request.requested_token_type == ACCESS_TOKEN_TYPE
    assert request.actor_token is None
    assert request.actor_token_type is None


def test_missing_subject_token_is_invalid_request() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        exchange(subject_token=None)
    assert caught.value.error == "invalid_request"
    assert "subject_token" in caught.value.reason


def test_missing_subject_token_type_is_invalid_request() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        exchange(subject_token_type=None)
    assert caught.value.error == "invalid_request"
    assert "subject_token_type" in caught.value.reason


def test_jwt_subject_token_type_is_accepted() -> None:
    assert exchange(subject_token_type=JWT_TOKEN_TYPE).subject_token_type == JWT_TOKEN_TYPE


@pytest.mark.parametrize(
    "token_type",
    [ID_TOKEN_TYPE, SAML2_TOKEN_TYPE, REFRESH_TOKEN_TYPE, "access_token", ACCESS_TOKEN_TYPE + "x"],
)
def test_unsupported_subject_token_types_are_invalid_request(token_type: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        exchange(subject_token_type=token_type)
    assert caught.value.error == "invalid_request"


def test_oversized_subject_token_is_invalid_request() -> None:
    with pytest.raises(InvalidRequestError):
        exchange(subject_token="a" * (MAX_TOKEN_CHARS + 1))


def test_actor_token_with_its_type_is_read() -> None:
    request = exchange(actor_token="actor.jwt.value", actor_token_type=JWT_TOKEN_TYPE)

    assert request.actor_token == "actor.jwt.value"
    assert request.actor_token_type == JWT_TOKEN_TYPE


def test_actor_token_without_actor_token_type_is_invalid_request() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        exchange(actor_token="actor.jwt.value")
    assert caught.value.error == "invalid_request"


def test_actor_token_type_without_actor_token_is_invalid_request() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        exchange(actor_token_type=JWT_TOKEN_TYPE)
    assert caught.value.error == "invalid_request"


@pytest.mark.parametrize("token_type", [ID_TOKEN_TYPE, SAML2_TOKEN_TYPE])
def test_unsupported_actor_token_type_is_invalid_request(token_type: str) -> None:
    with pytest.raises(InvalidRequestError):
        exchange(actor_token="actor.jwt.value", actor_token_type=token_type)


def test_oversized_actor_token_is_invalid_request() -> None:
    with pytest.raises(InvalidRequestError):
        exchange(actor_token="a" * (MAX_TOKEN_CHARS + 1), actor_token_type=JWT_TOKEN_TYPE)


@pytest.mark.parametrize("token_type", [ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE])
def test_requested_token_type_access_token_or_jwt_is_accepted(token_type: str) -> None:
    assert exchange(requested_token_type=token_type).requested_token_type == token_type


@pytest.mark.parametrize("token_type", [ID_TOKEN_TYPE, REFRESH_TOKEN_TYPE, SAML2_TOKEN_TYPE])
def test_unsupported_requested_token_type_is_invalid_request(token_type: str) -> None:
    with pytest.raises(InvalidRequestError):
        exchange(requested_token_type=token_type)


def test_repeated_audiences_and_resources_are_combined_into_deduplicated_targets() -> None:
    request = exchange(
        audience=["https://a.example", "upstream-b", "https://a.example"],
        resource=["https://c.example/api", "https://a.example"],
    )

    assert request.audiences == ("https://a.example", "upstream-b", "https://a.example")
    assert request.resources == ("https://c.example/api", "https://a.example")
    assert request.targets == ("https://a.example", "upstream-b", "https://c.example/api")


def test_resource_alone_is_a_target() -> None:
    request = exchange(audience=None, resource="https://c.example/api?v=1")
    assert request.targets == ("https://c.example/api?v=1",)


@pytest.mark.parametrize(
    "resource",
    [
        "relative/path",
        "/absolute/path",
        "code-search",
        "https://c.example/api#fragment",
        "https://c.example/api#",
        "https:///no-host",
        "//c.example/no-scheme",
        "http://[::1",
    ],
)
def test_resource_that_is_not_an_absolute_uri_without_fragment_is_invalid_target(
    resource: str,
) -> None:
    with pytest.raises(InvalidTargetError) as caught:
        exchange(resource=resource)
    assert caught.value.error == "invalid_target"


def test_audience_need_not_be_a_uri() -> None:
    # RFC 8693 §2.1: audience is "the logical name of the target service".
    assert exchange(audience="code-search").audiences == ("code-search",)


def test_no_audience_and_no_resource_is_invalid_request() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        exchange(audience=None)
    assert caught.value.error == "invalid_request"


def test_too_many_targets_are_refused() -> None:
    audiences = [f"https://t{i}.example" for i in range(MAX_TARGETS + 1)]
    with pytest.raises(InvalidTargetError) as caught:
        exchange(audience=audiences)
    assert caught.value.error == "invalid_target"


def test_oversized_audience_is_invalid_target() -> None:
    with pytest.raises(InvalidTargetError):
        exchange(audience="https://a.example/" + "p" * 4096)


def test_scope_is_split_on_spaces_and_deduplicated_in_order() -> None:
    assert exchange(scope="code.read code.search code.read").scopes == (
        "code.read",
        "code.search",
    )


def test_scope_tokens_are_case_sensitive() -> None:
    assert exchange(scope="Read read").scopes == ("Read", "read")


@pytest.mark.parametrize(
    "scope",
    [
        "code.read  code.search",  # two spaces: an empty scope token
        " code.read",
        "code.read ",
        "code.read\tcode.search",
        'code."read"',
        "code\\read",
        "caf\u00e9",
    ],
)
def test_invalid_scope_tokens_are_invalid_scope(scope: str) -> None:
    with pytest.raises((InvalidScopeError, InvalidRequestError)) as caught:
        exchange(scope=scope)
    # A tab is a control character and is refused by the form parser; the rest are scope errors.
    expected = "invalid_request" if "\t" in scope else "invalid_scope"
    assert caught.value.error == expected


def test_oversized_scope_is_invalid_scope() -> None:
    with pytest.raises(InvalidScopeError) as caught:
        exchange(scope=" ".join(f"s{i}" for i in range(1000)))
    assert caught.value.error == "invalid_scope"


def test_form_params_many_of_an_absent_name_is_empty() -> None:
    assert FormParams({}).many("audience") == []
