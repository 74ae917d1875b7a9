"""The audit event a decision fills in (sidecar/audit/event.py), from the grant's own outcomes:
``Granted`` and ``Facts`` built here as the grant builds them, and the protocol errors it raises."""

from __future__ import annotations

import dataclasses

import pytest

from sidecar.audit import DENIED, FIELDS, GRANTED, AuditEvent, denied_event, granted_event
from sidecar.errors import (
    InvalidClientError,
    InvalidRequestError,
    InvalidTargetError,
    TemporarilyUnavailableError,
)
from sidecar.exchange.grant import Facts, Granted, Refused, TokenResponse

AT = 1_800_000_000.25
MINTED = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"  # what the client receives

FACTS = Facts(
    audiences=("https://code-search.internal/mcp", "https://tickets.internal/mcp"),
    subject="alice@example.com",
    subject_issuer="https://idp.test.example",
    subject_token_sha256="0123456789abcdef",
    actor="svc-gateway",
)


def granted(*, reused: bool = False, facts: Facts = FACTS) -> Granted:
    return Granted(
        response=TokenResponse(
            access_token=MINTED,
            issued_token_type="urn:ietf:params:oauth:token-type:access_token",
            expires_in=120,
            scope="code.read code.search",
        ),
        facts=facts,
        jti="jti-1",
        kid="key-1",
        expires_at=1_800_000_120,
        reused=reused,
        policies=("gateway -> https://code-search.internal/mcp@3",),
    )


# --- a grant --------------------------------------------------------------------------------------


def test_a_grant_records_the_minted_tokens_jti_kid_expiry_and_scope() -> None:
    event = granted_event(AT, "gateway", granted(), request_id="req-1", latency_ms=0.75)

    assert dataclasses.asdict(event) == {
        "at": AT,
        "decision": GRANTED,
        "error": None,
        "reason": None,
        "client_id": "gateway",
        "subject": "alice@example.com",
        "subject_issuer": "https://idp.test.example",
        "subject_token_sha256": "0123456789abcdef",
        "actor": "svc-gateway",
        "audiences": ["https://code-search.internal/mcp", "https://tickets.internal/mcp"],
        "scope": "code.read code.search",
        "jti": "jti-1",
        "expires_at": 1_800_000_120,
        "kid": "key-1",
        "request_id": "req-1",
        "latency_ms": 0.75,
        "policies": "gateway -> https://code-search.internal/mcp@3",
    }


def test_a_grant_never_records_the_minted_token_itself() -> None:
    event = granted_event(AT, "gateway", granted())
    assert MINTED not in repr(event)
    assert all(MINTED not in str(value) for value in dataclasses.asdict(event).values())


def test_a_reused_token_is_recorded_with_the_reason() -> None:
    assert granted_event(AT, "gateway", granted(reused=True)).reason == "reused a minted token"


def test_the_audiences_are_recorded_as_a_list_of_their_own() -> None:
    first = granted_event(AT, "gateway", granted())
    second = granted_event(AT, "gateway", granted())

    assert first.audiences == list(FACTS.audiences)
    first.audiences.append("https://changed.example")
    assert second.audiences == list(FACTS.audiences)  # one event's list is not another's


# --- a denial -------------------------------------------------------------------------------------


def test_a_denial_records_the_error_code_and_the_internal_reason() -> None:
    error = InvalidRequestError(reason="subject token expired")

    event = denied_event(AT, "gateway", error)

    assert (event.at, event.decision, event.error, event.reason) == (
        AT,
        DENIED,
        "invalid_request",
        "subject token expired",
    )
    assert event.client_id == "gateway"


def test_a_denial_without_a_reason_records_the_errors_description() -> None:
    event = denied_event(AT, "gateway", InvalidRequestError())
    assert event.reason == InvalidRequestError.description


def test_a_denial_before_client_authentication_has_no_client() -> None:
    event = denied_event(AT, None, InvalidClientError(reason="unknown client"))
    assert (event.client_id, event.error) == (None, "invalid_client")


def test_a_denial_without_facts_records_nothing_of_the_request() -> None:
    event = denied_event(AT, "gateway", InvalidRequestError(reason="missing subject_token"))

    assert (event.subject, event.subject_issuer, event.subject_token_sha256, event.actor) == (
        None,
        None,
        None,
        None,
    )
    assert event.audiences == []


def test_a_denial_records_how_far_the_request_got() -> None:
    refused = Refused(
        error=InvalidTargetError(reason="no policy matched"),
        facts=Facts(audiences=("https://tickets.internal/mcp",), subject="bob@example.com"),
    )

    event = denied_event(AT, "gateway", refused.error, refused.facts)

    assert event.audiences == ["https://tickets.internal/mcp"]
    assert event.subject == "bob@example.com"
    assert (event.subject_issuer, event.actor) == (None, None)


def test_a_grant_refused_late_records_no_token() -> None:
    # The grant was signed, but its audit record could not be queued: the token was never sent,
    # so the denial carries the facts of the grant and nothing of the token.
    late = granted()

    event = denied_event(
        AT, "gateway", TemporarilyUnavailableError(reason="audit trail unavailable"), late.facts
    )

    assert (event.decision, event.error) == (DENIED, "temporarily_unavailable")
    assert event.subject == "alice@example.com"
    assert (event.jti, event.kid, event.expires_at, event.scope) == (None, None, None, None)


# --- the event ------------------------------------------------------------------------------------


def test_fields_lists_the_event_fields_in_order() -> None:
    assert [f.name for f in dataclasses.fields(AuditEvent)] == list(FIELDS)
    assert FIELDS[:2] == ("at", "decision")


def test_an_event_holds_only_its_fields() -> None:
    event = AuditEvent(at=AT)
    with pytest.raises(AttributeError):
        event.token = MINTED  # type: ignore[attr-defined]


def test_an_event_is_a_denial_unless_said_otherwise() -> None:
    event = AuditEvent(at=AT)
    assert (event.decision, event.audiences) == (DENIED, [])
    assert AuditEvent(at=AT).audiences is not event.audiences
