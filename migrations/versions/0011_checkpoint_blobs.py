"""Model checkpoints in the database: content-addressed blobs (by sha256) stored in
chunks of about a MiB, so that hosts sharing the database share every version's weights
and the home's checkpoint files become a cache.

The weights of versions made before this revision are still only files in the home that
made them: ``voiceprint db upgrade`` imports them after the schema step (a data step
outside Alembic, as it reads the home folder, which a migration does not know).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "checkpoint_blobs",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("chunks", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_checkpoint_blobs")),
    )
    op.create_table(
        "checkpoint_chunks",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["sha256"], ["checkpoint_blobs.sha256"], name=op.f("fk_checkpoint_chunks_sha256_checkpoint_blobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("sha256", "seq", name=op.f("pk_checkpoint_chunks")),
    )


def downgrade() -> None:
    op.drop_table("checkpoint_chunks")
    op.drop_table("checkpoint_blobs")
