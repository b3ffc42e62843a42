"""Diarization jobs: long recordings uploaded to the service and diarized in the background.

``POST /v1/diarize/jobs`` streams a recording to the receiving server's disk and answers
202 with a job; ``GET /v1/diarize/jobs/{id}`` follows it. The rows live apart from
``jobs`` (refreshes and rollbacks, which share the lock that moves the active version).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "diarization_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("owner", sa.String(), nullable=False),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("speakers", sa.Integer(), nullable=True),
        sa.Column("done", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("total", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("result", sa.JSON(), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed')", name=op.f("ck_diarization_jobs_status")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_diarization_jobs")),
    )
    op.create_index(op.f("ix_diarization_jobs_status"), "diarization_jobs", ["status"])


def downgrade() -> None:
    op.drop_index(op.f("ix_diarization_jobs_status"), table_name="diarization_jobs")
    op.drop_table("diarization_jobs")
