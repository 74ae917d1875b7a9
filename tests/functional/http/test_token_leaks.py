"""The subject token, client secrets and client assertions never leave the token endpoint: not in
a response body or header, not in a log line (at DEBUG), not in the audit trail, whether the
exchange succeeds or fails."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from urllib.parse import urlencode

import jwt
import pytest
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from sidecar.services import Services
from sidecar.store.audit_query import EXCHANGES
from sidecar.store.models import AuditEventRow
from tests.conftest import (
    ACCESS_TOKEN_TYPE,
    CLIENT_ASSERTION_TYPE,
    GATEWAY_SECRET,
    OTHER_SECRET,
    ClientKeys,
    LiveServer,
    TestIdP,
)
from tests.functional.http.helpers import exchange_form, post_token

WRONG_SECRET = "not-the-secret-" + "z" * 24


def secret_parts(token: str) -> list[str]:
    """The token, and its payload and signature segments: a log that kept only part of the
    token still leaks it. (The header segment is shared by every token of a key.)"""
    _header, payload, signature = token.split(".")
    return [token, payload, signature]


def assert_absent(values: Iterable[str], where: str, text: str) -> None:
    for value in values:
        assert value not in text, f"a secret value leaked into {where}"


def log_lines(caplog: pytest.LogCaptureFixture, *, product_only: bool = False) -> str:
    """Every captured record as a handler would write it (message, arguments, exception text)."""
    records = caplog.records
    if product_only:
        # urllib3 (the test's HTTP client) and werkzeug (the test server) log the request URL.
        records = [r for r in records if not r.name.startswith(("urllib3", "werkzeug"))]
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(record) for record in records)


def audit_text(services: Services) -> str:
    assert services.audit.flush()
    with sessionmaker(services.engine)() as session:
        rows = session.scalars(select(AuditEventRow)).all()
        columns = AuditEventRow.__table__.columns.keys()
        return "\n".join(repr(getattr(row, name)) for row in rows for name in columns)


def test_the_subject_token_never_leaks_on_success_or_failure(
    server: LiveServer,
    services: Services,
    idp: TestIdP,
    client_keys: ClientKeys,
    captured_logs: pytest.LogCaptureFixture,
) -> None:
    subject = idp.token(email="alice@example.com")
    now = int(time.time())
    expired = idp.token(iat=now - 7200, exp=now - 3600)
    assertion = client_keys.assertion()
    sensitive = [
        *secret_parts(subject),
        *secret_parts(expired),
        *secret_parts(assertion),
        GATEWAY_SECRET,
        OTHER_SECRET,
        WRONG_SECRET,
    ]

    responses = [
        server.exchange(subject, scope="code.read"),  # granted
        server.exchange(subject, auth=("gateway", WRONG_SECRET)),  # invalid_client (Basic)
        post_token(
            server,
            exchange_form(subject, client_id="gateway", client_secret=WRONG_SECRET),
            auth=None,
        ),  # invalid_client (post)
        server.exchange(subject, auth=("no-exchange", OTHER_SECRET)),  # unauthorized_client
        server.exchange(subject, grant_type="client_credentials"),  # unsupported_grant_type
        server.exchange(subject, scope="code.write"),  # invalid_scope
        server.exchange(subject, audience="https://payments.internal/mcp"),  # invalid_target
        server.exchange(expired),  # invalid_request: expired subject token
        server.exchange(subject + "\n"),  # invalid_request: control character
        server.exchange(
            subject, actor_token=expired, actor_token_type=ACCESS_TOKEN_TYPE
        ),  # bad actor
        post_token(  # private_key_jwt, granted, then the same assertion replayed
            server,
            exchange_form(
                subject, client_assertion_type=CLIENT_ASSERTION_TYPE, client_assertion=assertion
            ),
            auth=None,
        ),
        post_token(
            server,
            exchange_form(
                subject, client_assertion_type=CLIENT_ASSERTION_TYPE, client_assertion=assertion
            ),
            auth=None,
        ),
    ]

    statuses = [r.status_code for r in responses]
    assert statuses == [200, 401, 401, 400, 400, 400, 400, 400, 400, 400, 200, 401]
    minted = [r.json()["access_token"] for r in responses if r.status_code == 200]
    for response in responses:
        assert_absent(sensitive, "a response body", response.text)
        assert_absent(sensitive, "a response header", repr(dict(response.headers)))
    logs = log_lines(captured_logs)
    assert "exchange" in logs  # the audit log lines were captured
    assert_absent(sensitive, "a log line", logs)
    # A minted token is identified by its jti, never logged whole.
    assert_absent(minted, "a log line", logs)
    assert_absent([*sensitive, *minted], "the audit trail", audit_text(services))


def test_a_token_in_the_query_string_reaches_no_log_of_the_service(
    server: LiveServer, idp: TestIdP, captured_logs: pytest.LogCaptureFixture
) -> None:
    subject = idp.token()
    url = f"{server.token_url}?{urlencode({'subject_token': subject})}"
    response = post_token(server, exchange_form(subject), url=url)
    assert response.status_code == 400
    assert_absent(secret_parts(subject), "a response", response.text + repr(response.headers))
    assert_absent(secret_parts(subject), "a log line", log_lines(captured_logs, product_only=True))


def test_the_audit_trail_identifies_tokens_by_fingerprint_and_jti_only(
    server: LiveServer, services: Services, idp: TestIdP
) -> None:
    subject = idp.token()
    response = server.exchange(subject)
    assert response.status_code == 200, response.text
    minted = jwt.decode(response.json()["access_token"], options={"verify_signature": False})

    assert services.audit.flush()
    with sessionmaker(services.engine)() as session:
        [row] = session.scalars(
            select(AuditEventRow).where(AuditEventRow.decision.in_(EXCHANGES))
        ).all()
    assert row.subject_token_sha256 == hashlib.sha256(subject.encode()).hexdigest()[:16]
    assert row.jti == minted["jti"]
    assert_absent(secret_parts(subject), "the audit trail", audit_text(services))
    assert_absent([response.json()["access_token"]], "the audit trail", audit_text(services))
