"""The audit trail's database, for the tests of the audit modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.support import AuditDatabase


@pytest.fixture
def db(tmp_path: Path) -> Iterator[AuditDatabase]:
    database = AuditDatabase(tmp_path / "a.db")
    yield database
    if database.away:
        database.bring_back()
    for trail in database.trails:
        trail.close(timeout=5)
    database.engine.dispose()
