"""Policies get a unique name, an optional issuer filter and subject conditions; several policies
may now exist for one client and audience (exclusive by issuer or conditions).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("policies") as batch:
        batch.add_column(sa.Column("name", sa.String(255), nullable=True))
        batch.add_column(sa.Column("issuer", sa.String(2048), nullable=True))
        batch.add_column(sa.Column("conditions", sa.Text(), nullable=False, server_default="[]"))
        batch.drop_constraint("uq_policies_target", type_="unique")
    # The default name "CLIENT -> AUDIENCE"; one too long for the column is cut and made unique
    # with the row id.
    op.execute(
        "UPDATE policies SET name = CASE"
        " WHEN length(client_id || ' -> ' || audience) <= 255 THEN client_id || ' -> ' || audience"
        " ELSE substr(client_id || ' -> ' || audience, 1, 240) || ' #' || CAST(id AS VARCHAR(12))"
        " END"
    )
    with op.batch_alter_table("policies") as batch:
        batch.alter_column("name", existing_type=sa.String(255), nullable=False)
        batch.create_unique_constraint("uq_policies_name", ["name"])
        batch.create_index("ix_policies_client_audience", ["client_id", "audience"])

    with op.batch_alter_table("policy_versions") as batch:
        batch.add_column(sa.Column("name", sa.String(255), nullable=True))
    op.execute(
        "UPDATE policy_versions SET name = COALESCE("
        " (SELECT p.name FROM policies p"
        "  WHERE p.client_id = policy_versions.client_id AND p.audience = policy_versions.audience),"
        " substr(client_id || ' -> ' || audience, 1, 255))"
    )
    with op.batch_alter_table("policy_versions") as batch:
        batch.alter_column("name", existing_type=sa.String(255), nullable=False)
        batch.create_index("ix_policy_versions_name", ["name", "version"])


def downgrade() -> None:
    with op.batch_alter_table("policy_versions") as batch:
        batch.drop_index("ix_policy_versions_name")
        batch.drop_column("name")
    with op.batch_alter_table("policies") as batch:
        batch.drop_index("ix_policies_client_audience")
        batch.drop_constraint("uq_policies_name", type_="unique")
        batch.drop_column("conditions")
        batch.drop_column("issuer")
        batch.drop_column("name")
        batch.create_unique_constraint("uq_policies_target", ["client_id", "audience"])
