"""Assertions and raw requests shared by the HTTP tests of the token endpoint."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import requests

from tests.conftest import (
    ACCESS_TOKEN_TYPE,
    CODE_SEARCH,
    GATEWAY_SECRET,
    OTHER_SECRET,
    TOKEN_EXCHANGE,
    Gateway,
    LiveServer,
)

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
    """A valid token-exchange form as (name, value) pairs; params override (None drops one)."""
    form: dict[str, str | None] = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject_token,
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "audience": CODE_SEARCH,
    }
    form.update(params)
    return [(name, value) for name, value in form.items() if value is not None]
