"""Through POST /token, what a client sends reaches the audit trail redacted (sidecar/audit.py):
a subject token pasted into another parameter is kept only as its SHA-256 prefix, a password in
a resource URI not at all, and a long value only up to a short bound, in the row and in the
``sidecar.audit`` log line alike, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from sidecar.audit import MAX_TEXT
from sidecar.exchange.request import MAX_TARGET_CHARS
from sidecar.exchange.subject import token_fingerprint
from sidecar.services import Services
from sidecar.store.models import AuditEventRow
from tests.conftest import LiveServer, TestIdP, audit_rows
from tests.functional.http.helpers import exchange_form, post_token


@pytest.fixture
def config(config: dict[str, Any], database_url: str) -> dict[str, Any]:
    config["database_url"] = database_url
    return config


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The ``exchange {json}`` lines of the sidecar.audit log, parsed."""
    lines = []
    for record in caplog.records:
        message = record.getMessage()
        if record.name == "sidecar.audit" and message.startswith("exchange "):
            lines.append(json.loads(message.removeprefix("exchange ")))
    return lines


def only_decision(services: Services, caplog: pytest.LogCaptureFixture) -> tuple[Any, str]:
    """The request's one audit row, and everything the trail keeps of it as text: every column
    and every captured sidecar.audit record as a handler would write it."""
    [row] = audit_rows(services)
    columns = AuditEventRow.__table__.columns.keys()
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    logged = [formatter.format(r) for r in caplog.records if r.name == "sidecar.audit"]
    assert len(audit_lines(caplog)) == 1
    return row, "\n".join([*(repr(getattr(row, name)) for name in columns), *logged])


def assert_token_absent(token: str, text: str) -> None:
    # The whole token, and its payload and signature on their own: a prefix cut to a column's
    # size would still hold the header and most of the payload.
    _header, payload, signature = token.split(".")
    for part in (token, payload, signature, token[:MAX_TEXT]):
        assert part not in text


@pytest.fixture
def audit_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="sidecar.audit")
    return caplog


def test_a_subject_token_sent_as_audience_is_kept_as_its_sha256_prefix(
    server: LiveServer, services: Services, idp: TestIdP, audit_log: pytest.LogCaptureFixture
) -> None:
    subject = idp.token()
    response = server.exchange(subject, audience=subject)
    assert response.json()["error"] == "invalid_target"

    row, text = only_decision(services, audit_log)
    assert_token_absent(subject, text)
    assert row.subject_token_sha256  # the token was verified: its fingerprint is recorded
    marker = f"sha256:{row.subject_token_sha256}"
    assert json.loads(row.audiences or "") == [marker]
    [line] = audit_lines(audit_log)
    assert line["audiences"] == [marker]


def test_a_subject_token_sent_as_scope_is_kept_as_its_sha256_prefix(
    server: LiveServer, services: Services, idp: TestIdP, audit_log: pytest.LogCaptureFixture
) -> None:
    subject = idp.token()
    response = server.exchange(subject, scope=f"code.read {subject}")
    assert response.json()["error"] == "invalid_scope"

    row, text = only_decision(services, audit_log)
    assert_token_absent(subject, text)
    marker = f"sha256:{row.subject_token_sha256}"
    # The refusal's reason names the scope tokens the policy does not allow: this one, redacted.
    assert row.reason == f"scope not allowed by the policy: {marker}"
    [line] = audit_lines(audit_log)
    assert line["reason"] == row.reason


def test_a_subject_token_as_a_repeated_parameter_name_is_kept_as_its_sha256_prefix(
    server: LiveServer, services: Services, idp: TestIdP, audit_log: pytest.LogCaptureFixture
) -> None:
    subject = idp.token()
    form = [*exchange_form(subject), (subject, "1"), (subject, "2")]
    response = post_token(server, form)
    assert response.json()["error"] == "invalid_request"

    row, text = only_decision(services, audit_log)
    assert_token_absent(subject, text)
    assert row.subject_token_sha256 is None  # refused while parsing: never verified
    assert row.reason == f"repeated parameter sha256:{token_fingerprint(subject)}"


def test_an_unauthenticated_client_id_is_never_stored(
    server: LiveServer, services: Services, idp: TestIdP, audit_log: pytest.LogCaptureFixture
) -> None:
    subject = idp.token()
    response = server.exchange(subject, auth=None, client_id=subject, client_secret="x" * 40)
    assert response.json()["error"] == "invalid_client"

    row, text = only_decision(services, audit_log)
    assert row.client_id is None  # only an authenticated client is attributed
    assert_token_absent(subject, text)


def test_a_password_in_a_resource_uri_is_dropped(
    server: LiveServer, services: Services, idp: TestIdP, audit_log: pytest.LogCaptureFixture
) -> None:
    response = server.exchange(
        idp.token(), audience=None, resource="https://user:s3cret@host.example/x"
    )
    assert response.json()["error"] == "invalid_target"

    row, text = only_decision(services, audit_log)
    assert "s3cret" not in text
    assert json.loads(row.audiences or "") == ["https://host.example/x"]
    [line] = audit_lines(audit_log)
    assert line["audiences"] == ["https://host.example/x"]


def test_the_longest_audience_the_parser_takes_is_stored_cut_to_the_bound(
    server: LiveServer, services: Services, idp: TestIdP, audit_log: pytest.LogCaptureFixture
) -> None:
    audience = "https://long.example/" + "a" * (MAX_TARGET_CHARS - 21)
    assert len(audience) == MAX_TARGET_CHARS
    response = server.exchange(idp.token(), audience=audience)
    assert response.json()["error"] == "invalid_target"

    row, text = only_decision(services, audit_log)
    assert json.loads(row.audiences or "") == [audience[:MAX_TEXT]]
    [line] = audit_lines(audit_log)
    assert line["audiences"] == [audience[:MAX_TEXT]]
    assert audience[: MAX_TEXT + 1] not in text


def test_a_10000_character_audience_is_not_stored_beyond_the_bound(
    server: LiveServer, services: Services, idp: TestIdP, audit_log: pytest.LogCaptureFixture
) -> None:
    audience = "https://huge.example/" + "b" * (10_000 - 21)
    response = server.exchange(idp.token(), audience=audience)
    assert response.json()["error"] == "invalid_target"  # over the parser's size cap

    row, text = only_decision(services, audit_log)
    stored = json.loads(row.audiences or "")
    assert all(len(value) <= MAX_TEXT for value in stored)
    assert "b" * (MAX_TEXT - 20) not in text
