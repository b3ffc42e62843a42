"""Enrollment review and score calibration.

``utterances.status``: an utterance that does not sound like the speaker it was
enrolled under is kept as ``pending`` (stored, but outside the centroid) until a person
accepts or removes it. ``calibrations``: score-to-LLR fits and decision thresholds,
refitted over a version's life as enrollments grow; the newest one of a version is used.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("utterances") as batch:
        batch.add_column(sa.Column("status", sa.String(), nullable=False, server_default="enrolled"))
        batch.create_check_constraint("status", "status IN ('enrolled', 'pending')")
    op.create_table(
        "calibrations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["version"], ["model_versions.number"], name=op.f("fk_calibrations_version_model_versions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calibrations")),
    )
    op.create_index(op.f("ix_calibrations_version"), "calibrations", ["version"])


def downgrade() -> None:
    op.drop_index(op.f("ix_calibrations_version"), table_name="calibrations")
    op.drop_table("calibrations")
    with op.batch_alter_table("utterances") as batch:
        batch.drop_constraint(op.f("ck_utterances_status"), type_="check")
        batch.drop_column("status")
