"""SQLAlchemy models: the only place where tables are defined.

The schema itself changes only through an Alembic revision in ``migrations/``;
``tests/test_migrations.py`` proves the two never drift apart.

Vectors are raw little-endian bytes (float32 embeddings and means, float64 centroid
sums) so the same schema works on SQLite and PostgreSQL without extensions.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Index,
    false,
    LargeBinary,
    MetaData,
    String,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

VERSION_STATUSES = ("candidate", "active", "rejected", "retired")
JOB_STATUSES = ("queued", "running", "succeeded", "rejected", "failed", "skipped")
# "pending": stored for review but outside its speaker's centroid (it did not sound like them).
UTTERANCE_STATUSES = ("enrolled", "pending")
DIARIZATION_STATUSES = ("queued", "running", "succeeded", "failed")
# Service roles: admin does everything; enroll adds and reads profiles; query identifies and verifies.
KEY_ROLES = ("admin", "enroll", "query")

# Tables that live in our database but belong to a library, which creates them itself:
# APScheduler keeps the persisted refresh schedule in apscheduler_jobs (engine/scheduler.py).
FOREIGN_TABLES = frozenset({"apscheduler_jobs"})

# Named so that the store can recognise a duplicate enrollment from the database error.
UTTERANCE_CONTENT_UNIQUE = "uq_utterances_speaker_id_content_sha256"


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC timestamps on every backend.

    SQLite has no time zone type: it stores the wall clock and hands back naive
    values, so times are converted to UTC on the way in and marked UTC on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass a timezone-aware one")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    # Deterministic constraint names, identical on both backends, so later revisions
    # (and SQLite batch migrations) can refer to them.
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {
        datetime: UTCDateTime,
        dict[str, Any]: JSON,
        float: Double,
        bytes: LargeBinary,
    }


class Speaker(Base):
    __tablename__ = "speakers"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String, unique=True)
    created_at: Mapped[datetime]


class Utterance(Base):
    __tablename__ = "utterances"
    __table_args__ = (
        UniqueConstraint("speaker_id", "content_sha256"),
        CheckConstraint(
            "status IN (" + ", ".join(f"'{s}'" for s in UTTERANCE_STATUSES) + ")", name="status"
        ),
        # Ids are never reused (SQLite would hand a deleted highest id to the next insert),
        # so "id > trained_through" always means new to a version (migration 0005).
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    speaker_id: Mapped[int] = mapped_column(ForeignKey("speakers.id", ondelete="CASCADE"))
    source: Mapped[str]
    content_sha256: Mapped[str] = mapped_column(String(64))  # of the original input bytes
    duration_s: Mapped[float]  # input length
    speech_s: Mapped[float]  # after VAD
    quality: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    status: Mapped[str] = mapped_column(server_default="enrolled")


class UtteranceAudio(Base):
    """The 16 kHz speech-only audio of an utterance, kept for re-embedding and replay.

    A table of its own so that listing utterances never loads audio.
    """

    __tablename__ = "utterance_audio"

    utterance_id: Mapped[int] = mapped_column(
        ForeignKey("utterances.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    codec: Mapped[str]
    sample_rate: Mapped[int]
    data: Mapped[bytes]


class UnlabeledUtterance(Base):
    """An utterance that arrived without a speaker: embedded and kept like an enrolled
    one (same ``[privacy] keep``), but in no centroid and never trained on, until a
    cluster of them is named (``engine/discovery.py``). A table of its own, so nothing
    that reads profiles or training data can pick one up by mistake."""

    __tablename__ = "unlabeled_utterances"
    __table_args__ = ({"sqlite_autoincrement": True},)  # ids never reused: a cluster is numbered by its first one

    id: Mapped[int] = mapped_column(primary_key=True)
    source: Mapped[str]
    content_sha256: Mapped[str] = mapped_column(String(64), unique=True)  # of the original input bytes
    duration_s: Mapped[float]
    speech_s: Mapped[float]
    quality: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
    codec: Mapped[str]  # what is kept, as utterance_audio keeps it
    sample_rate: Mapped[int]
    data: Mapped[bytes] = mapped_column(deferred=True)  # listing never loads it


class UnlabeledEmbedding(Base):
    __tablename__ = "unlabeled_embeddings"

    utterance_id: Mapped[int] = mapped_column(
        ForeignKey("unlabeled_utterances.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(ForeignKey("model_versions.number"), primary_key=True)
    vector: Mapped[bytes]  # float32 little-endian
    created_at: Mapped[datetime]


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (
        CheckConstraint(
            "status IN (" + ", ".join(f"'{s}'" for s in VERSION_STATUSES) + ")", name="status"
        ),
    )

    # Numbered by the store (max + 1 inside the creating transaction), never by a sequence,
    # so version numbers are dense and the same on every backend.
    number: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent: Mapped[int | None] = mapped_column(ForeignKey("model_versions.number"))
    status: Mapped[str]
    encoder: Mapped[str]
    config: Mapped[dict[str, Any]]
    checkpoint: Mapped[str]
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]]
    note: Mapped[str | None]
    created_at: Mapped[datetime]
    # Highest utterance id its training saw (0: trained elsewhere); later ones are "new".
    trained_through: Mapped[int] = mapped_column(server_default="0")


class Alias(Base):
    __tablename__ = "aliases"

    name: Mapped[str] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(ForeignKey("model_versions.number"))
    updated_at: Mapped[datetime]


class AliasMove(Base):
    """Append-only log of alias moves: who moved which alias, when and why."""

    __tablename__ = "alias_history"

    id: Mapped[int] = mapped_column(primary_key=True)
    alias: Mapped[str]
    version: Mapped[int]
    previous_version: Mapped[int | None]
    actor: Mapped[str]
    reason: Mapped[str]
    moved_at: Mapped[datetime]


class Embedding(Base):
    __tablename__ = "embeddings"

    utterance_id: Mapped[int] = mapped_column(
        ForeignKey("utterances.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(ForeignKey("model_versions.number"), primary_key=True)
    vector: Mapped[bytes]  # float32 little-endian
    created_at: Mapped[datetime]


class Centroid(Base):
    __tablename__ = "centroids"

    speaker_id: Mapped[int] = mapped_column(
        ForeignKey("speakers.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(ForeignKey("model_versions.number"), primary_key=True)
    dim: Mapped[int]
    count: Mapped[int]
    sum: Mapped[bytes]  # float64 little-endian, exact running sum
    mean: Mapped[bytes]  # float32 little-endian, sum / count, what 1:N search loads
    updated_at: Mapped[datetime]
    # The change feed: the revision of the transaction that last wrote the row (see
    # CentroidFeed); a process holding a version's centroids reads only newer rows.
    revision: Mapped[int] = mapped_column(BigInteger, server_default="0")

    __table_args__ = (Index("ix_centroids_version_revision", "version", "revision"),)


class CentroidFeed(Base):
    """One row: the revision of the newest committed transaction that changed a centroid.

    A writer bumps it as the last statement before its commit, holding the row's lock
    until then, so revisions commit in their own order and a reader that takes this value
    first finds every change up to it already visible."""

    __tablename__ = "centroid_feed"

    id: Mapped[int] = mapped_column(primary_key=True)
    revision: Mapped[int] = mapped_column(BigInteger)


class CentroidTombstone(Base):
    """A centroid that was deleted (an erasure, a removed last utterance, a dropped
    version), so that the processes holding it drop it too. Integers only: no name."""

    __tablename__ = "centroid_tombstones"

    version: Mapped[int] = mapped_column(primary_key=True)
    speaker_id: Mapped[int] = mapped_column(primary_key=True)
    revision: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_centroid_tombstones_version_revision", "version", "revision"),)


class CheckpointBlob(Base):
    """A model checkpoint stored in the database, once per content (its sha256, what a
    version's ``checkpoint_sha256`` records), so that every host on the database loads any
    version with nothing shared but the URL; the home's file is a cache of it. The bytes
    are in :class:`CheckpointChunk` rows, written in the same transaction as this row: a
    blob that is here is whole."""

    __tablename__ = "checkpoint_blobs"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    chunks: Mapped[int]
    created_at: Mapped[datetime]


class CheckpointChunk(Base):
    """One piece (about a MiB) of a stored checkpoint: no query moves a whole checkpoint."""

    __tablename__ = "checkpoint_chunks"

    sha256: Mapped[str] = mapped_column(
        String(64), ForeignKey("checkpoint_blobs.sha256", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)  # 0, 1, ... in order
    data: Mapped[bytes]


class Job(Base):
    """A refresh, queued (by a drift signal or a request), running, or finished.

    Only one job runs at a time (a database-level lock, see ``Store.exclusive``); a job
    left "running" by a killed process is marked failed by the next one to start.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(
            "status IN (" + ", ".join(f"'{s}'" for s in JOB_STATUSES) + ")", name="status"
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str]
    status: Mapped[str] = mapped_column(index=True)
    reason: Mapped[str]
    # A dry run trains and evaluates and stores no version; requests merge only with their own kind.
    dry_run: Mapped[bool] = mapped_column(server_default=false())
    owner: Mapped[str | None]  # host:pid of the process running it
    version: Mapped[int | None] = mapped_column(ForeignKey("model_versions.number"))
    result: Mapped[dict[str, Any]]
    requested_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class DiarizationJob(Base):
    """A long recording uploaded for diarization (``POST /v1/diarize/jobs``), run by the
    server process that received it (``owner``), whose disk holds the upload until the
    job ends. Apart from ``jobs``: those change the active version under one lock, these
    only read."""

    __tablename__ = "diarization_jobs"
    __table_args__ = (
        CheckConstraint(
            "status IN (" + ", ".join(f"'{s}'" for s in DIARIZATION_STATUSES) + ")", name="status"
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(index=True)
    owner: Mapped[str]  # host:pid of the server holding the upload
    source: Mapped[str]  # the upload's name (a form's file name, or "upload")
    speakers: Mapped[int | None]  # the number of speakers, when the client gave it
    done: Mapped[int] = mapped_column(server_default="0")  # progress: blocks embedded
    total: Mapped[int] = mapped_column(server_default="0")
    result: Mapped[dict[str, Any]]  # the Diarization, or {"error", "message"}
    requested_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class Calibration(Base):
    """A score calibration of one model version: AS-norm cohort settings, the
    score-to-LLR map and the decision thresholds (``engine.calibration.Calibration``)."""

    __tablename__ = "calibrations"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[int] = mapped_column(ForeignKey("model_versions.number"), index=True)
    params: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]


class ApiKey(Base):
    """A service API key: only its SHA-256 digest is stored, with a short prefix to name it by."""

    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint("role IN (" + ", ".join(f"'{r}'" for r in KEY_ROLES) + ")", name="role"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    prefix: Mapped[str] = mapped_column(String(16))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str]
    note: Mapped[str]
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class AuditEntry(Base):
    """Append-only record of actions on personal data and keys.

    ``detail`` never names a speaker whose data was erased: it keeps counts only.
    """

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    action: Mapped[str]
    actor: Mapped[str]
    detail: Mapped[dict[str, Any]]
    at: Mapped[datetime]


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """Alembic autogenerate filter: leave :data:`FOREIGN_TABLES` (and their indexes) alone."""
    table = obj if type_ == "table" else getattr(obj, "table", None)
    return getattr(table, "name", name) not in FOREIGN_TABLES
