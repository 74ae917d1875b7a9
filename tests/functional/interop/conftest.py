"""Every interoperability test runs its exchanges against SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture
def config(config: dict[str, Any], database_url: str) -> dict[str, Any]:
    config["database_url"] = database_url
    return config
