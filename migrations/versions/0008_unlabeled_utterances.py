"""Utterances that arrived without a speaker, and their embeddings per version.

``voiceprint stream`` rows without a speaker and ``POST /v1/unlabeled`` keep their
utterance here: embedded, its speech kept as ``[privacy] keep`` says, in no centroid.
Clusters of them are proposed as new speakers and, once named, enrolled through the
normal path (``engine/discovery.py``). SQLite's AUTOINCREMENT keeps ids from being
reused, since a cluster is numbered by its first utterance.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "unlabeled_utterances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("content_sha256", sa.String(length=64), nullable=False),
        sa.Column("duration_s", sa.Double(), nullable=False),
        sa.Column("speech_s", sa.Double(), nullable=False),
        sa.Column("quality", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("codec", sa.String(), nullable=False),
        sa.Column("sample_rate", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_unlabeled_utterances")),
        sa.UniqueConstraint("content_sha256", name=op.f("uq_unlabeled_utterances_content_sha256")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "unlabeled_embeddings",
        sa.Column("utterance_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["utterance_id"],
            ["unlabeled_utterances.id"],
            name=op.f("fk_unlabeled_embeddings_utterance_id_unlabeled_utterances"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["version"], ["model_versions.number"], name=op.f("fk_unlabeled_embeddings_version_model_versions")
        ),
        sa.PrimaryKeyConstraint("utterance_id", "version", name=op.f("pk_unlabeled_embeddings")),
    )


def downgrade() -> None:
    op.drop_table("unlabeled_embeddings")
    op.drop_table("unlabeled_utterances")
