"""Initial schema: speakers, utterances, model versions, aliases, embeddings, centroids.

Revision ID: 0001
Revises:
Create Date: 2026-11-22

Types are spelled out here rather than imported from storage.models, so this revision
keeps creating the same schema however the models evolve later.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _timestamp(name: str) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "speakers",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        _timestamp("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_speakers")),
        sa.UniqueConstraint("name", name=op.f("uq_speakers_name")),
    )
    op.create_table(
        "model_versions",
        sa.Column("number", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("parent", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("encoder", sa.String(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("checkpoint", sa.String(), nullable=False),
        sa.Column("checkpoint_sha256", sa.String(length=64), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("note", sa.String(), nullable=True),
        _timestamp("created_at"),
        sa.CheckConstraint(
            "status IN ('candidate', 'active', 'rejected', 'retired')",
            name=op.f("ck_model_versions_status"),
        ),
        sa.ForeignKeyConstraint(
            ["parent"],
            ["model_versions.number"],
            name=op.f("fk_model_versions_parent_model_versions"),
        ),
        sa.PrimaryKeyConstraint("number", name=op.f("pk_model_versions")),
    )
    op.create_table(
        "aliases",
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        _timestamp("updated_at"),
        sa.ForeignKeyConstraint(
            ["version"], ["model_versions.number"], name=op.f("fk_aliases_version_model_versions")
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_aliases")),
    )
    op.create_table(
        "alias_history",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("alias", sa.String(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("previous_version", sa.Integer(), nullable=True),
        sa.Column("actor", sa.String(), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        _timestamp("moved_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alias_history")),
    )
    op.create_table(
        "utterances",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("speaker_id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("content_sha256", sa.String(length=64), nullable=False),
        sa.Column("duration_s", sa.Double(), nullable=False),
        sa.Column("speech_s", sa.Double(), nullable=False),
        sa.Column("quality", sa.JSON(), nullable=False),
        _timestamp("created_at"),
        sa.ForeignKeyConstraint(
            ["speaker_id"],
            ["speakers.id"],
            name=op.f("fk_utterances_speaker_id_speakers"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_utterances")),
        sa.UniqueConstraint(
            "speaker_id", "content_sha256", name=op.f("uq_utterances_speaker_id_content_sha256")
        ),
    )
    op.create_table(
        "utterance_audio",
        sa.Column("utterance_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("codec", sa.String(), nullable=False),
        sa.Column("sample_rate", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["utterance_id"],
            ["utterances.id"],
            name=op.f("fk_utterance_audio_utterance_id_utterances"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("utterance_id", name=op.f("pk_utterance_audio")),
    )
    op.create_table(
        "embeddings",
        sa.Column("utterance_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        _timestamp("created_at"),
        sa.ForeignKeyConstraint(
            ["utterance_id"],
            ["utterances.id"],
            name=op.f("fk_embeddings_utterance_id_utterances"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["version"],
            ["model_versions.number"],
            name=op.f("fk_embeddings_version_model_versions"),
        ),
        sa.PrimaryKeyConstraint("utterance_id", "version", name=op.f("pk_embeddings")),
    )
    op.create_table(
        "centroids",
        sa.Column("speaker_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("sum", sa.LargeBinary(), nullable=False),
        sa.Column("mean", sa.LargeBinary(), nullable=False),
        _timestamp("updated_at"),
        sa.ForeignKeyConstraint(
            ["speaker_id"],
            ["speakers.id"],
            name=op.f("fk_centroids_speaker_id_speakers"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["version"],
            ["model_versions.number"],
            name=op.f("fk_centroids_version_model_versions"),
        ),
        sa.PrimaryKeyConstraint("speaker_id", "version", name=op.f("pk_centroids")),
    )


def downgrade() -> None:
    for table in (
        "centroids",
        "embeddings",
        "utterance_audio",
        "utterances",
        "alias_history",
        "aliases",
        "model_versions",
        "speakers",
    ):
        op.drop_table(table)
