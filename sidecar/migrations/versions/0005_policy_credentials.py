"""Policies get a credential mode: ``credential`` (mint, static or client_credentials) and the
``upstream`` whose credential a static or client_credentials policy hands out. Existing policies
keep minting.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("policies") as batch:
        batch.add_column(
            sa.Column("credential", sa.String(32), nullable=False, server_default="mint")
        )
        batch.add_column(sa.Column("upstream", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("policies") as batch:
        batch.drop_column("upstream")
        batch.drop_column("credential")
