"""Reading the policy tables back in tests of the stores."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, text


def snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the tables a policy apply writes, in a stable order."""
    with engine.connect() as connection:
        return {
            table: sorted(tuple(row) for row in connection.execute(text(f"SELECT * FROM {table}")))
            for table in ("policies", "policy_versions", "leases")
        }
