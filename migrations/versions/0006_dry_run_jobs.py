"""Refresh jobs say whether they are dry runs.

``POST /v1/refresh`` with ``{"dry_run": true}`` queues a dry run (train and evaluate a
candidate, store no version). Queued requests are merged into the refresh that starts
next, so the queue must tell the two apart: a dry run never covers a real request, and a
real refresh never stands in for a dry run. Jobs stored before read as real refreshes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("dry_run", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("dry_run")
