"""The audit trail operators use: each decision's request id (the ``X-Request-ID`` it was
answered under), its latency, and on a grant the policies that granted it with their versions
(``name@version``); indexes for the searches ``sidecar audit search`` makes (``jti``, subject,
client, time already).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(sa.Column("request_id", sa.String(128), nullable=True))
        batch.add_column(sa.Column("latency_ms", sa.Float(), nullable=True))
        batch.add_column(sa.Column("policies", sa.Text(), nullable=True))
    op.create_index("ix_audit_events_jti", "audit_events", ["jti"])
    op.create_index("ix_audit_events_subject", "audit_events", ["subject"])
    op.create_index("ix_audit_events_client_id", "audit_events", ["client_id"])


def downgrade() -> None:
    op.drop_index("ix_audit_events_client_id", "audit_events")
    op.drop_index("ix_audit_events_subject", "audit_events")
    op.drop_index("ix_audit_events_jti", "audit_events")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("policies")
        batch.drop_column("latency_ms")
        batch.drop_column("request_id")
