"""Every POST /token decision lands in the audit trail (docs/design.md §2 step 7), read back from
the database, against SQLite and PostgreSQL: a grant with the minted ``jti``, a denial with its
error code and reason."""

from __future__ import annotations

import json
from typing import Any

import jwt
import pytest

from sidecar.services import Services
from tests.conftest import CODE_SEARCH, LiveServer, TestIdP, audit_rows
from tests.functional.http.helpers import exchange_form, post_token


@pytest.fixture
def config(config: dict[str, Any], database_url: str) -> dict[str, Any]:
    config["database_url"] = database_url
    return config


def test_a_grant_is_recorded_with_the_minted_jti(
    server: LiveServer, services: Services, idp: TestIdP
) -> None:
    response = server.exchange(idp.token(sub="alice@example.com"), scope="code.search")
    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    claims = jwt.decode(token, options={"verify_signature": False})

    [row] = audit_rows(services)
    assert row.decision == "granted"
    assert row.error is None
    assert row.reason is None
    assert row.jti == claims["jti"]
    assert row.kid == jwt.get_unverified_header(token)["kid"]
    assert row.client_id == "gateway"
    assert row.subject == "alice@example.com"
    assert row.subject_issuer == idp.issuer
    assert json.loads(row.audiences or "[]") == [CODE_SEARCH]
    assert row.scope == "code.search"
    assert row.expires_at == claims["exp"]


def test_a_denial_is_recorded_with_its_error_and_reason(
    server: LiveServer, services: Services, idp: TestIdP
) -> None:
    response = server.exchange(idp.token(), audience="https://payments.internal/mcp")
    assert response.status_code == 400

    [row] = audit_rows(services)
    assert row.decision == "denied"
    assert row.error == "invalid_target"
    assert row.reason  # the internal cause, for the security team
    assert row.reason != "The requested audience or resource is not allowed."
    assert row.jti is None
    assert row.client_id == "gateway"
    assert row.subject == "alice@example.com"
    assert json.loads(row.audiences or "[]") == ["https://payments.internal/mcp"]


def test_a_denial_before_client_authentication_is_recorded(
    server: LiveServer, services: Services, idp: TestIdP
) -> None:
    response = server.exchange(idp.token(), auth=("gateway", "not-the-secret-" + "z" * 24))
    assert response.status_code == 401

    [row] = audit_rows(services)
    assert (row.decision, row.error) == ("denied", "invalid_client")
    assert row.reason
    assert row.client_id is None  # never authenticated, so not attributed to a client


@pytest.mark.parametrize(
    ("params", "error"),
    [
        ({"scope": "code.write"}, "invalid_scope"),
        ({"grant_type": "client_credentials"}, "unsupported_grant_type"),
        ({"subject_token_type": "urn:ietf:params:oauth:token-type:id_token"}, "invalid_request"),
    ],
)
def test_each_refusal_is_recorded_once_with_its_error_code(
    server: LiveServer, services: Services, idp: TestIdP, params: dict[str, str], error: str
) -> None:
    response = post_token(server, exchange_form(idp.token(), **params))
    assert response.json()["error"] == error

    [row] = audit_rows(services)
    assert (row.decision, row.error) == ("denied", error)
    assert row.reason


def test_one_row_per_request_in_order(server: LiveServer, services: Services, idp: TestIdP) -> None:
    subject = idp.token()
    outcomes = [
        server.exchange(subject).status_code,
        server.exchange(subject, scope="code.write").status_code,
        server.exchange(subject).status_code,
    ]
    assert outcomes == [200, 400, 200]
    rows = audit_rows(services)
    assert [row.decision for row in rows] == ["granted", "denied", "granted"]
    # The identical third request reused the first token (caches.minted_tokens), and says so.
    assert rows[2].jti == rows[0].jti
    assert (rows[0].reason, rows[2].reason) == (None, "reused a minted token")
