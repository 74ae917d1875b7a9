"""POST /token refusals after the client is authenticated, over real HTTP: other grant types
(``unsupported_grant_type``), scopes the policy or subject does not allow (``invalid_scope``), and
targets no enabled policy allows or that are malformed (``invalid_target``, RFC 8707 §2). Each
test runs on the in-process server and on ``sidecar serve`` (``gateway`` in tests/conftest.py)."""

from __future__ import annotations

import jwt
import pytest

from tests.conftest import CODE_SEARCH, DISABLED, TICKETS, Gateway
from tests.functional.http.helpers import assert_oauth_error, exchange_form, post_token

# --- unsupported_grant_type --------------------------------------------------------------------


@pytest.mark.parametrize(
    "grant_type",
    [
        "client_credentials",
        "authorization_code",
        "refresh_token",
        "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "urn:ietf:params:oauth:grant-type:token-exchange-v2",
        "totally-made-up",
    ],
)
def test_another_grant_type_is_unsupported_grant_type(gateway: Gateway, grant_type: str) -> None:
    subject = gateway.idp.token()
    response = gateway.exchange(subject, grant_type=grant_type)
    assert_oauth_error(response, 400, "unsupported_grant_type", subject, grant_type)


def test_the_grant_type_is_compared_exactly(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    response = gateway.exchange(
        subject, grant_type="URN:IETF:PARAMS:OAUTH:GRANT-TYPE:TOKEN-EXCHANGE"
    )
    assert_oauth_error(response, 400, "unsupported_grant_type", subject)


# --- invalid_scope -----------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["code.write", "code.read code.write", "tickets.read"])
def test_a_scope_outside_the_policy_is_invalid_scope(gateway: Gateway, scope: str) -> None:
    subject = gateway.idp.token(scope="code.read code.search code.write tickets.read")
    response = gateway.exchange(subject, scope=scope)
    assert_oauth_error(response, 400, "invalid_scope", subject, scope)


def test_a_scope_the_subject_lacks_is_invalid_scope_where_the_policy_requires_it(
    gateway: Gateway,
) -> None:
    subject = gateway.idp.token(scope="code.read")
    response = gateway.exchange(subject, audience=TICKETS, scope="tickets.read")
    assert_oauth_error(response, 400, "invalid_scope", subject)


def test_default_scopes_the_subject_lacks_are_invalid_scope_where_the_policy_requires_it(
    gateway: Gateway,
) -> None:
    subject = gateway.idp.token(scope="code.read")
    response = gateway.exchange(subject, audience=TICKETS)
    assert_oauth_error(response, 400, "invalid_scope", subject)


def test_a_scope_the_subject_holds_is_granted_where_the_policy_requires_it(
    gateway: Gateway,
) -> None:
    response = gateway.exchange(gateway.idp.token(scope="tickets.read"), audience=TICKETS)
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "tickets.read"


@pytest.mark.parametrize("scope", ["*", "code.*", "all"])
def test_an_omnibus_scope_is_invalid_scope(gateway: Gateway, scope: str) -> None:
    subject = gateway.idp.token(scope="*")
    response = gateway.exchange(subject, scope=scope)
    assert_oauth_error(response, 400, "invalid_scope", subject)


@pytest.mark.parametrize(
    "scope",
    ["code.read  code.search", " code.read", "code.read ", 'code."read"', "code\\read", "cöde"],
    ids=["double-space", "leading-space", "trailing-space", "quote", "backslash", "non-ascii"],
)
def test_a_malformed_scope_is_invalid_scope(gateway: Gateway, scope: str) -> None:
    subject = gateway.idp.token()
    response = gateway.exchange(subject, scope=scope)
    assert_oauth_error(response, 400, "invalid_scope", subject)


def test_scopes_are_case_sensitive(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    response = gateway.exchange(subject, scope="Code.Read")
    assert_oauth_error(response, 400, "invalid_scope", subject)


# --- invalid_target ----------------------------------------------------------------------------


def test_an_audience_with_no_policy_is_invalid_target(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    response = gateway.exchange(subject, audience="https://payments.internal/mcp")
    assert_oauth_error(response, 400, "invalid_target", subject)


def test_an_audience_of_another_clients_policy_only_is_invalid_target(gateway: Gateway) -> None:
    # TICKETS has a policy for gateway only; no-exchange's policies are not gateway's.
    subject = gateway.idp.token()
    response = gateway.exchange(subject, audience="https://tickets.internal/mcp/admin")
    assert_oauth_error(response, 400, "invalid_target", subject)


def test_a_disabled_policy_is_invalid_target(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    response = gateway.exchange(subject, audience=DISABLED, scope="code.read")
    assert_oauth_error(response, 400, "invalid_target", subject)


@pytest.mark.parametrize("forbidden", ["https://payments.internal/mcp", DISABLED])
def test_one_forbidden_audience_refuses_the_whole_request(gateway: Gateway, forbidden: str) -> None:
    subject = gateway.idp.token()
    form = [*exchange_form(subject, scope="code.read"), ("audience", forbidden)]
    response = post_token(gateway, form)
    assert_oauth_error(response, 400, "invalid_target", subject)
    assert "access_token" not in response.text


def test_one_forbidden_resource_refuses_the_whole_request(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    form = [*exchange_form(subject), ("resource", "https://payments.internal/mcp")]
    response = post_token(gateway, form)
    assert_oauth_error(response, 400, "invalid_target", subject)


@pytest.mark.parametrize(
    "resource",
    [
        CODE_SEARCH + "#fragment",
        CODE_SEARCH + "#",
        "/mcp",
        "code-search.internal/mcp",
        "//code-search.internal/mcp",
        "https:///mcp",
        "http://[::1/mcp",
    ],
    ids=[
        "fragment",
        "empty-fragment",
        "relative-path",
        "no-scheme",
        "network-path",
        "no-host",
        "malformed-ipv6",
    ],
)
def test_a_malformed_resource_is_invalid_target(gateway: Gateway, resource: str) -> None:
    subject = gateway.idp.token()
    response = gateway.exchange(subject, audience=None, resource=resource)
    assert_oauth_error(response, 400, "invalid_target", subject, resource)


def test_a_resource_with_a_policy_is_accepted(gateway: Gateway) -> None:
    response = gateway.exchange(gateway.idp.token(), audience=None, resource=CODE_SEARCH)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "audience",
    [
        CODE_SEARCH + "/",
        CODE_SEARCH.upper(),
        CODE_SEARCH.replace("/mcp", "/MCP"),
        CODE_SEARCH + "/admin",
        CODE_SEARCH + "\u200b",
        "\u200b" + CODE_SEARCH,
        CODE_SEARCH.replace("https://", "http://"),
        CODE_SEARCH.replace(".internal", ".internal."),
        CODE_SEARCH.replace(".internal", ".internal:8443"),
        CODE_SEARCH + "?",
        CODE_SEARCH.replace("-", "\u2010"),  # a Unicode hyphen
        " " + CODE_SEARCH,
        CODE_SEARCH + " ",
        CODE_SEARCH.replace("/mcp", "/./mcp"),
        CODE_SEARCH.replace("/mcp", "/%6Dcp"),
    ],
    ids=[
        "trailing-slash",
        "upper-case",
        "path-case",
        "extra-segment",
        "zero-width-space-after",
        "zero-width-space-before",
        "http-scheme",
        "trailing-dot-host",
        "other-port",
        "empty-query",
        "unicode-hyphen",
        "leading-space",
        "trailing-space",
        "dot-segment",
        "percent-encoded-path",
    ],
)
def test_a_near_miss_audience_is_invalid_target(gateway: Gateway, audience: str) -> None:
    # Only the scheme and host case and a default port are normalised (issue 5); no other
    # normalisation may turn a look-alike into a match.
    subject = gateway.idp.token()
    response = gateway.exchange(subject, audience=audience)
    assert_oauth_error(response, 400, "invalid_target", subject)


@pytest.mark.parametrize(
    "audience",
    [
        "https://Code-Search.INTERNAL/mcp",
        "HTTPS://code-search.internal/mcp",
        "https://code-search.internal:443/mcp",
    ],
    ids=["host-case", "scheme-case", "default-port"],
)
def test_an_equivalent_uri_matches_and_the_token_names_the_policy_audience(
    gateway: Gateway, audience: str
) -> None:
    response = gateway.exchange(gateway.idp.token(), audience=audience)

    assert response.status_code == 200, response.text
    claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    assert claims["aud"] == CODE_SEARCH


def test_too_many_targets_is_invalid_target(gateway: Gateway) -> None:
    subject = gateway.idp.token()
    form = exchange_form(subject) + [
        ("audience", f"https://upstream-{index}.internal/mcp") for index in range(10)
    ]
    response = post_token(gateway, form)
    assert_oauth_error(response, 400, "invalid_target", subject)
