"""The centroid change feed: a revision on every centroid row, the feed's counter, and
tombstones for deleted centroids, so that each process keeps its 1:N index current by
reading only what changed (engine/gallery.py).

Existing rows start at revision 0, the counter at 0: a process builds its index from
every row once, then follows the feed.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("centroids") as batch:
        batch.add_column(sa.Column("revision", sa.BigInteger(), nullable=False, server_default="0"))
    op.create_index("ix_centroids_version_revision", "centroids", ["version", "revision"])
    feed = op.create_table(
        "centroid_feed",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_centroid_feed")),
    )
    op.bulk_insert(feed, [{"id": 1, "revision": 0}])
    op.create_table(
        "centroid_tombstones",
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("speaker_id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("version", "speaker_id", name=op.f("pk_centroid_tombstones")),
    )
    op.create_index("ix_centroid_tombstones_version_revision", "centroid_tombstones", ["version", "revision"])


def downgrade() -> None:
    op.drop_index("ix_centroid_tombstones_version_revision", table_name="centroid_tombstones")
    op.drop_table("centroid_tombstones")
    op.drop_table("centroid_feed")
    op.drop_index("ix_centroids_version_revision", table_name="centroids")
    with op.batch_alter_table("centroids") as batch:
        batch.drop_column("revision")
