"""Utterance ids are never reused.

Which utterances a version has seen is recorded as the highest id its training saw
(``model_versions.trained_through``), and a refresh keeps its snapshot by id. SQLite
hands a deleted highest rowid to the next insert, so after erasing (or removing) the
newest utterance, the next enrollment took its id and counted as already trained on.
``AUTOINCREMENT`` makes SQLite issue every id once; PostgreSQL's sequence already does.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("utterances", recreate="always", table_kwargs={"sqlite_autoincrement": True}):
            pass
        # Ids deleted before today may sit below a version's trained_through: start above
        # every id any version has seen, not only above the ids still stored.
        op.execute(
            "INSERT INTO sqlite_sequence (name, seq) SELECT 'utterances', 0 "
            "WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'utterances')"
        )
        op.execute(
            "UPDATE sqlite_sequence SET seq = max(seq, (SELECT coalesce(max(trained_through), 0) FROM model_versions)) "
            "WHERE name = 'utterances'"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("utterances", recreate="always", table_kwargs={"sqlite_autoincrement": False}):
            pass
