"""Assertions and raw requests shared by the HTTP tests of the token endpoint, and the check an
upstream makes of the tokens it mints."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jwt
import requests

from tests.conftest import (
    CLIENT_ASSERTION_TYPE,
    CODE_SEARCH,
    GATEWAY_SECRET,
    OTHER_SECRET,
    SIDECAR_ISSUER,
    Gateway,
    LiveServer,
    exchange_params,
)

# The parameters of a token-exchange request (RFC 8693 §2.1, and RFC 6749 §2.3.1's client_id) ...
REQUEST_PARAMETERS = (
    "grant_type",
    "subject_token",
    "subject_token_type",
    "audience",
    "resource",
    "scope",
    "requested_token_type",
    "actor_token",
    "actor_token_type",
    "client_id",
)
# ... and those that carry the client's credentials (RFC 6749 §2.3.1, RFC 7523 §2.2).
CLIENT_CREDENTIAL_PARAMETERS = ("client_secret", "client_assertion", "client_assertion_type")

# RFC 6749 §5.2 bodies carry short, fixed descriptions (docs/design.md §2): every description the
# token endpoint may answer with, by error code. A description outside this catalogue is either new
# wording (add it here) or text built from request input (a leak).
FIXED_DESCRIPTIONS: dict[str, frozenset[str]] = {
    "invalid_request": frozenset(
        {
            "The request is malformed.",
            "A required parameter is missing.",
            "A parameter has an empty value.",
            "A parameter is included more than once.",
            "The request body is too large.",
            "The token type is not supported.",
            "A token is too large.",
            "An audience or resource parameter is required.",
            "The token is invalid.",
            "Method Not Allowed.",
        }
    ),
    "invalid_client": frozenset({"Client authentication failed."}),
    "unauthorized_client": frozenset({"The client is not allowed to use this grant type."}),
    "unsupported_grant_type": frozenset({"The grant type is not supported."}),
    "invalid_scope": frozenset({"The requested scope is not allowed."}),
    "invalid_target": frozenset({"The requested audience or resource is not allowed."}),
    "temporarily_unavailable": frozenset(
        {"The service is temporarily unavailable.", "Too many requests."}  # 503, 429
    ),
    "server_error": frozenset({"Internal error."}),
}
CLIENT_SECRETS = (GATEWAY_SECRET, OTHER_SECRET)


def assert_no_leak(response: requests.Response, *values: str) -> None:
    """None of ``values`` (tokens, secrets, request input) appears in the body or any header."""
    for value in (*CLIENT_SECRETS, *values):
        assert value not in response.text
        for name, header in response.headers.items():
            assert value not in header, f"leaked into the {name} header"


def assert_oauth_error(
    response: requests.Response, status: int, error: str, *never_echoed: str
) -> dict[str, Any]:
    """An RFC 6749 §5.2 error: status, code, a fixed description, the no-store headers, JSON, and
    no token, secret or other request input (``never_echoed``) in the body or headers."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Pragma"] == "no-cache"
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "error_description"}, body
    assert body["error"] == error, body
    assert body["error_description"] in FIXED_DESCRIPTIONS[error], body
    assert_no_leak(response, *never_echoed)
    return body


def post_token(
    server: LiveServer | Gateway,
    body: bytes | str | Iterator[bytes] | list[tuple[str, str]],
    *,
    auth: tuple[str, str] | None = ("gateway", GATEWAY_SECRET),
    headers: dict[str, str] | None = None,
    url: str | None = None,
) -> requests.Response:
    """POST to /token with exactly this body (a raw one, or a form that may repeat names); to a
    :class:`Gateway`, over its kept-alive connection when it has one."""
    if isinstance(server, Gateway):
        return server.post(url or server.token_url, data=body, auth=auth, headers=headers or {})
    return requests.post(
        url or server.token_url, data=body, auth=auth, headers=headers or {}, timeout=10
    )


def exchange_form(subject_token: str, /, **params: str | None) -> list[tuple[str, str]]:
    """A valid token-exchange form (:func:`tests.conftest.exchange_params`) as (name, value)
    pairs; params override (None drops one)."""
    return list(exchange_params(subject_token, **params).items())


def assertion_form(
    subject_token: str, assertion: str, **params: str | None
) -> list[tuple[str, str]]:
    """:func:`exchange_form` authenticated by an RFC 7523 client ``assertion``."""
    return exchange_form(
        subject_token,
        **{"client_assertion_type": CLIENT_ASSERTION_TYPE, "client_assertion": assertion, **params},
    )


def send_exactly(
    method: str,
    url: str,
    data: Any,
    content_type: str | None,
    *,
    auth: tuple[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> requests.Response:
    """One request on a connection of its own with this Content-Type, or none at all for None
    (where requests would add one of its own)."""
    sent = dict(headers or {})
    if content_type is not None:
        sent["Content-Type"] = content_type
    session = requests.Session()
    prepared = session.prepare_request(
        requests.Request(method, url, data=data, auth=auth, headers=sent)
    )
    if content_type is None:
        prepared.headers.pop("Content-Type", None)
    try:
        return session.send(prepared, timeout=10)
    finally:
        session.close()


def jwks_client(base_url: str) -> jwt.PyJWKClient:
    """PyJWT's JWKS client on the sidecar's JWKS at ``base_url``."""
    return jwt.PyJWKClient(f"{base_url}/.well-known/jwks.json")


def verify_as_upstream(
    jwks: jwt.PyJWKClient, token: str, audience: str = CODE_SEARCH
) -> dict[str, Any]:
    """An RFC 9068 resource server's check of a minted token, its claims: the key by kid from
    ``jwks``, then the signature, the one algorithm we publish, issuer, audience, the required
    claims, exp and iat, and typ."""
    verified = jwt.api_jwt.decode_complete(
        token,
        jwks.get_signing_key_from_jwt(token),
        algorithms=["ES256"],
        audience=audience,
        issuer=SIDECAR_ISSUER,
        options={"require": ["exp", "iat", "iss", "aud", "sub", "jti", "client_id"]},
    )
    # RFC 9068 §4: the resource server MUST check that typ is at+jwt (or application/at+jwt).
    if verified["header"].get("typ") not in ("at+jwt", "application/at+jwt"):
        raise jwt.InvalidTokenError("not an RFC 9068 access token")
    claims: dict[str, Any] = verified["payload"]
    return claims
