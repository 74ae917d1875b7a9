"""Policies get ``reuse_tokens``: whether a still-fresh token minted under the policy may be
handed out again for an identical request. Existing policies keep reusing (true).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("policies") as batch:
        batch.add_column(
            sa.Column("reuse_tokens", sa.Boolean(), nullable=False, server_default=sa.true())
        )


def downgrade() -> None:
    with op.batch_alter_table("policies") as batch:
        batch.drop_column("reuse_tokens")
