"""Reading the audit trail back (sidecar/store/audit_query.py): newest first, and each filter
narrowing exactly, against the real SQLite file and, marked postgres, PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import delete

from sidecar.audit import DENIED, GRANTED, AuditEvent
from sidecar.services import Services
from sidecar.store.audit_query import AuditFilter, search
from sidecar.store.models import AuditEventRow

CODE = "https://code-search.internal/mcp"
TICKETS = "https://tickets.internal/mcp"


def record(services: Services, *events: AuditEvent) -> None:
    for event in events:
        services.audit.record(event)
    assert services.audit.flush()


@pytest.fixture
def trail(services: Services) -> Services:
    # Only these exchanges: not the policy changes that set the service up (test_changes.py).
    with services.engine.begin() as connection:
        connection.execute(delete(AuditEventRow))
    record(
        services,
        AuditEvent(at=1000.0, decision=GRANTED, client_id="gateway", subject="alice",
                   audiences=[CODE], jti="j-1", request_id="r-1", policies="code@1"),
        AuditEvent(at=2000.0, decision=DENIED, error="invalid_target", client_id="gateway",
                   subject="bob", audiences=[TICKETS], reason="no policy"),
        AuditEvent(at=3000.0, decision=GRANTED, client_id="other", subject="alice",
                   audiences=[CODE, TICKETS], jti="j-3"),
    )  # fmt: skip
    return services


def subjects(found: list[dict[str, Any]]) -> list[tuple[float, str]]:
    return [(row["at"], row["subject"]) for row in found]


def test_the_newest_come_first_and_the_limit_holds(trail: Services) -> None:
    assert subjects(search(trail.engine, AuditFilter(limit=2))) == [
        (3000.0, "alice"),
        (2000.0, "bob"),
    ]


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (AuditFilter(since=2000.0), [3000.0, 2000.0]),
        (AuditFilter(until=2000.0), [1000.0]),
        (AuditFilter(client_id="gateway"), [2000.0, 1000.0]),
        (AuditFilter(subject="alice"), [3000.0, 1000.0]),
        (AuditFilter(decision=DENIED), [2000.0]),
        (AuditFilter(jti="j-3"), [3000.0]),
        (AuditFilter(kind="exchange"), [3000.0, 2000.0, 1000.0]),
        (AuditFilter(kind="change"), []),
        (AuditFilter(audience=TICKETS), [3000.0, 2000.0]),
        (AuditFilter(audience="https://code-search.internal"), []),  # a prefix is no match
        (AuditFilter(client_id="gateway", decision=GRANTED, audience=CODE), [1000.0]),
    ],
)
def test_each_filter_narrows_exactly(
    trail: Services, where: AuditFilter, expected: list[float]
) -> None:
    assert [row["at"] for row in search(trail.engine, where)] == expected


def test_rows_come_back_with_every_recorded_field(trail: Services) -> None:
    [row] = search(trail.engine, AuditFilter(jti="j-1"))
    assert row["audiences"] == [CODE]
    assert (row["request_id"], row["policies"], row["decision"]) == ("r-1", "code@1", GRANTED)
