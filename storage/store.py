"""The only code that talks SQL.

:class:`Store` wraps SQLite (the embedded default) or PostgreSQL and returns the frozen
records of :mod:`storage.records`. Every public method runs in one managed session that
commits, rolls back and closes, and turns SQLAlchemy errors into the project's own.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine, Table, create_engine, delete, event, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

import migrations
from engine.centroids import RunningCentroid
from engine.errors import (
    DuplicateUtterance,
    IncompleteVersion,
    InvalidInput,
    NotInitialised,
    RefreshBusy,
    SchemaOutdated,
    StorageError,
    UnknownSpeaker,
    UnknownVersion,
    VersionChanged,
)
from storage import models as m
from storage.records import (
    AliasMove,
    ApiKey,
    AuditEntry,
    Centroid,
    Enrollment,
    Job,
    ModelVersion,
    SpeakerSummary,
    UtteranceRecord,
)

ACTIVE = "active"
log = logging.getLogger(__name__)

FINISHED_JOB = ("succeeded", "rejected", "failed", "skipped")
# In-memory SQLite lives in one process, so an in-process lock is the whole story there.
_MEMORY_LOCKS: dict[str, threading.Lock] = {}
SQLITE_BUSY_TIMEOUT_MS = 30_000
_INSERTS = {"postgresql": postgresql_insert, "sqlite": sqlite_insert}


class Store:
    """Speakers, utterances, embeddings, centroids and model versions in one database.

    Parameters
    ----------
    url
        SQLAlchemy URL, e.g. ``sqlite:////home/me/.voiceprint/voiceprint.db`` or
        ``postgresql+psycopg://user:pw@host/db``. The parent folder of a SQLite file
        must exist.
    echo
        Log every SQL statement (SQLAlchemy's ``echo``).

    Raises
    ------
    StorageError
        The URL names an unsupported backend or the database cannot be opened.
    """

    def __init__(self, url: str, *, echo: bool = False):
        try:
            self._url: URL = make_url(url)
        except SQLAlchemyError as exc:
            raise StorageError(f"invalid database URL: {exc}") from exc
        self._backend = self._url.get_backend_name()
        if self._backend not in _INSERTS:
            raise StorageError(f"unsupported database {self.url}: use sqlite or postgresql")
        with self._translating("open the database"):
            if self._backend == "sqlite":
                self._write = _sqlite_engine(self._url, echo=echo, begin="BEGIN IMMEDIATE")
                # An in-memory database exists once per connection: reads must share it.
                self._read = (
                    self._write
                    if _in_memory(self._url)
                    else _sqlite_engine(self._url, echo=echo, begin="BEGIN")
                )
            else:
                self._write = self._read = create_engine(self._url, echo=echo, pool_pre_ping=True)
            with self._read.connect():
                pass
        self._read_sessions = sessionmaker(self._read, expire_on_commit=False)
        self._write_sessions = sessionmaker(self._write, expire_on_commit=False)

    @property
    def url(self) -> str:
        """The database URL with its password masked."""
        return self._url.render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every pooled connection."""
        self._write.dispose()
        self._read.dispose()

    # ------------------------------------------------------------------ schema

    def upgrade(self, revision: str = "head") -> None:
        """Migrate the schema up to ``revision`` (Alembic)."""
        with self._session(f"upgrade the schema to {revision}", write=True) as s:
            command.upgrade(self._alembic_config(s), revision)

    def downgrade(self, revision: str = "base") -> None:
        """Migrate the schema down to ``revision`` (Alembic); ``base`` drops every table."""
        with self._session(f"downgrade the schema to {revision}", write=True) as s:
            command.downgrade(self._alembic_config(s), revision)

    def current_revision(self) -> str | None:
        """The Alembic revision of the database, None when it was never migrated."""
        with self._session("read the schema revision") as s:
            return MigrationContext.configure(s.connection()).get_current_revision()

    def head_revision(self) -> str:
        """The newest Alembic revision this code knows."""
        head = ScriptDirectory.from_config(self._alembic_config()).get_current_head()
        if head is None:
            raise StorageError("the installed package holds no migration revision")
        return head

    def check_schema(self) -> None:
        """Raise :class:`SchemaOutdated` unless the database is at the code's revision."""
        current, head = self.current_revision(), self.head_revision()
        if current != head:
            raise SchemaOutdated(
                f"database at {current or 'no revision (empty)'}, code expects {head}: "
                "run `voiceprint db upgrade`"
            )

    # ------------------------------------------------------ versions and aliases

    def create_version(
        self,
        *,
        encoder: str,
        config: dict,
        checkpoint: str,
        checkpoint_sha256: str,
        parent: int | None = None,
        status: str = "candidate",
        metrics: dict | None = None,
        note: str | None = None,
        trained_through: int = 0,
    ) -> ModelVersion:
        """Record a new model version, numbered one past the highest so far.

        ``trained_through`` is the highest utterance id its training saw: utterances
        after it are "new" to the version (what the next refresh learns from).
        """
        if status not in m.VERSION_STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(m.VERSION_STATUSES)}")
        with self._session("create a model version", write=True) as s:
            if self._backend == "postgresql":
                # Serialise numbering between concurrent creators; readers and
                # enrollments (row-level key-share locks) are not blocked.
                s.execute(text("LOCK TABLE model_versions IN SHARE ROW EXCLUSIVE MODE"))
            if parent is not None:
                _version_row(s, parent)
            number = (s.scalar(select(func.max(m.ModelVersion.number))) or 0) + 1
            row = m.ModelVersion(
                number=number,
                parent=parent,
                status=status,
                encoder=encoder,
                config=config,
                checkpoint=checkpoint,
                checkpoint_sha256=checkpoint_sha256,
                metrics=metrics or {},
                note=note,
                created_at=_now(),
                trained_through=trained_through,
            )
            s.add(row)
            s.flush()
            return _version_record(row, active_number=None)

    def get_version(self, number: int) -> ModelVersion:
        """One model version; :class:`UnknownVersion` if there is none numbered so."""
        with self._session(f"read model version {number}") as s:
            return _version_record(_version_row(s, number), _alias_target(s, ACTIVE))

    def list_versions(self) -> list[ModelVersion]:
        """Every model version, by ascending number."""
        with self._session("list model versions") as s:
            active = _alias_target(s, ACTIVE)
            rows = s.scalars(select(m.ModelVersion).order_by(m.ModelVersion.number))
            return [_version_record(row, active) for row in rows]

    def active_version(self) -> ModelVersion:
        """The version the "active" alias points at; :class:`NotInitialised` if none."""
        with self._session("read the active model version") as s:
            active = _alias_target(s, ACTIVE)
            if active is None:
                raise NotInitialised("no active model version: run `voiceprint init`")
            return _version_record(_version_row(s, active), active)

    def set_alias(
        self, alias: str, version: int, *, actor: str, reason: str, require_complete: bool = False
    ) -> None:
        """Point ``alias`` at ``version`` and append the move to the alias history.

        Moving "active" also marks the new version active and the one it replaces
        retired, in the same transaction.

        With ``require_complete`` the move happens only if every utterance has an
        embedding under ``version``; otherwise :class:`IncompleteVersion` is raised and
        nothing changes. The check runs after the alias row is locked, and enrollments
        hold a share lock on that row (see :meth:`enroll`), so no enrollment can slip in
        between the check and the move.
        """
        with self._session(f"move alias {alias!r} to version {version}", write=True) as s:
            target = _version_row(s, version)
            now = _now()
            created = _insert_ignoring_conflict(
                s, m.Alias.__table__, {"name": alias, "version": version, "updated_at": now}
            )
            # Locked so that two concurrent moves record each other as previous_version.
            row = s.execute(
                select(m.Alias).where(m.Alias.name == alias).with_for_update()
            ).scalar_one()
            previous = None if created else row.version
            if require_complete:
                missing = s.scalar(select(func.count()).select_from(_missing_embeddings_query(version).subquery()))
                if missing:
                    raise IncompleteVersion(
                        f"version {version} has no embedding for {missing} utterance(s) yet"
                    )
            row.version, row.updated_at = version, now
            if alias == ACTIVE:
                if previous is not None and previous != version:
                    _version_row(s, previous).status = "retired"
                target.status = "active"
            s.add(
                m.AliasMove(
                    alias=alias,
                    version=version,
                    previous_version=previous,
                    actor=actor,
                    reason=reason,
                    moved_at=now,
                )
            )

    def update_version(
        self, number: int, *, status: str | None = None, metrics: dict | None = None, note: str | None = None
    ) -> ModelVersion:
        """Change a version's status, metrics (replaced whole) or note.

        The "active" status belongs to the alias: it is set only by :meth:`set_alias`.
        """
        if status is not None and status not in m.VERSION_STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(m.VERSION_STATUSES)}")
        if status == "active":
            raise ValueError("a version becomes active by moving the alias: use set_alias")
        with self._session(f"update model version {number}", write=True) as s:
            row = _version_row(s, number)
            if status is not None:
                row.status = status
            if metrics is not None:
                row.metrics = metrics
            if note is not None:
                row.note = note
            s.flush()
            return _version_record(row, _alias_target(s, ACTIVE))

    def alias_history(self, alias: str = ACTIVE) -> list[AliasMove]:
        """Every move of ``alias``, oldest first."""
        with self._session(f"read the history of alias {alias!r}") as s:
            rows = s.scalars(
                select(m.AliasMove).where(m.AliasMove.alias == alias).order_by(m.AliasMove.id)
            )
            return [
                AliasMove(r.alias, r.version, r.previous_version, r.actor, r.reason, r.moved_at)
                for r in rows
            ]

    # ---------------------------------------------------------------- enrollment

    def enroll(
        self,
        *,
        speaker: str,
        version: int,
        source: str,
        content_sha256: str,
        duration_s: float,
        speech_s: float,
        quality: dict,
        audio: bytes,
        codec: str,
        sample_rate: int,
        embedding: np.ndarray,
        expect_active: bool = False,
        hold: Callable[[np.ndarray | None, int], bool] | None = None,
    ) -> Enrollment:
        """Store one utterance of ``speaker`` and fold its embedding into the centroid.

        ``hold(previous_mean, count)`` is asked, inside the transaction and with the
        speaker's row locked, whether to keep the utterance *pending* instead: stored
        with its embedding, but outside the centroid until :meth:`accept_utterance`.

        With ``expect_active``, ``version`` must still be the active version when the
        transaction runs, else :class:`VersionChanged` is raised and nothing is stored:
        an utterance embedded for a version that was just replaced would otherwise be
        missing from the new one.

        Speaker (created on first use), utterance, audio, embedding and centroid are
        written in one transaction: on any failure nothing is stored.

        Returns
        -------
        Enrollment
            The stored utterance and the centroid mean before and after it.

        Raises
        ------
        DuplicateUtterance
            The speaker already has an utterance with this ``content_sha256``.
        UnknownVersion
            No model version ``version``.
        ValueError
            ``embedding`` is not a finite vector of the dimension stored at ``version``.
        """
        vector = np.asarray(embedding, dtype=np.float32)
        if vector.ndim != 1 or not np.all(np.isfinite(vector)):
            raise ValueError(f"embedding must be a finite 1-D vector, got shape {vector.shape}")
        # Core statements rather than ORM objects: enrollment is the hot path, and the
        # unit of work's bookkeeping cost more than the SQL itself.
        doing = f"enroll {source!r} for speaker {speaker!r}"
        with self._version_checked(version), self._session(doing, write=True) as s:
            if expect_active:
                # A share lock: enrollments run side by side, but an alias move waits for
                # them, and they wait for it (see set_alias(require_complete=True)).
                active = s.execute(
                    select(m.Alias.version).where(m.Alias.name == ACTIVE).with_for_update(read=True)
                ).scalar()
                if active != version:
                    raise VersionChanged(f"the active version is now {active}, not {version}")
            now = _now()
            # Race-safe get-or-create: concurrent first enrollments of one speaker all
            # succeed instead of failing on the unique name.
            _insert_ignoring_conflict(s, m.Speaker.__table__, {"name": speaker, "created_at": now})
            # The row lock serialises enrollments of one speaker across processes, so the
            # read-modify-write of its centroid cannot lose an update (SQLite: BEGIN
            # IMMEDIATE already serialises every writer).
            speaker_id = s.execute(
                select(m.Speaker.id).where(m.Speaker.name == speaker).with_for_update()
            ).scalar_one()
            centroid = s.execute(
                select(m.Centroid.dim, m.Centroid.count, m.Centroid.sum).where(
                    m.Centroid.speaker_id == speaker_id, m.Centroid.version == version
                )
            ).first()
            if centroid is None:
                # A new profile: its dimension must agree with the version's other profiles.
                dim = s.scalar(select(m.Centroid.dim).where(m.Centroid.version == version).limit(1))
                running, previous_mean = RunningCentroid(dim=dim or vector.size), None
            else:
                dim = centroid.dim
                running = RunningCentroid(dim=dim, sum=_from_f64(centroid.sum), count=centroid.count)
                previous_mean = running.mean
            if dim is not None and dim != vector.size:
                raise ValueError(f"embedding has {vector.size} values, version {version} stores {dim}")
            status = "pending" if hold is not None and hold(previous_mean, running.count) else "enrolled"
            utterance_id = s.execute(
                insert(m.Utterance).returning(m.Utterance.id),
                {
                    "speaker_id": speaker_id,
                    "source": source,
                    "content_sha256": content_sha256,
                    "duration_s": duration_s,
                    "speech_s": speech_s,
                    "quality": quality,
                    "created_at": now,
                    "status": status,
                },
            ).scalar_one()
            s.execute(
                insert(m.UtteranceAudio),
                {"utterance_id": utterance_id, "codec": codec, "sample_rate": sample_rate, "data": audio},
            )
            s.execute(
                insert(m.Embedding),
                {"utterance_id": utterance_id, "version": version, "vector": _f32(vector), "created_at": now},
            )
            if status == "enrolled":
                _write_centroid(s, speaker_id, version, running.learn_one(vector), now, exists=centroid is not None)
            record = UtteranceRecord(
                id=utterance_id,
                speaker=speaker,
                source=source,
                content_sha256=content_sha256,
                duration_s=duration_s,
                speech_s=speech_s,
                quality=dict(quality),
                created_at=now,
                status=status,
            )
            return Enrollment(
                utterance=record,
                version=version,
                count=running.count,
                previous_mean=previous_mean,
                mean=running.mean if running.count else None,
                speech_s=_profile_speech(s, speaker_id),
            )

    def accept_utterance(self, utterance_id: int, embeddings: dict[int, np.ndarray] | None = None) -> UtteranceRecord:
        """Move a pending utterance into its speaker's profile.

        ``embeddings`` ({version: vector}) adds embeddings it lacks (the active version
        may have changed since it was held). Every embedding it has is folded into that
        version's centroid, in one transaction.

        Raises
        ------
        InvalidInput
            No such utterance, or it is not pending.
        """
        with self._session(f"accept utterance {utterance_id}", write=True) as s:
            row = self._utterance_locked(s, utterance_id)
            if row.status != "pending":
                raise InvalidInput(f"utterance {utterance_id} is not pending review")
            now = _now()
            for version, vector in (embeddings or {}).items():
                _insert_ignoring_conflict(
                    s,
                    m.Embedding.__table__,
                    {"utterance_id": utterance_id, "version": version, "vector": _f32(vector), "created_at": now},
                )
            self._fold(s, row, +1, now)
            row.status = "enrolled"
            return _utterance_record(row, s.get(m.Speaker, row.speaker_id).name)

    def remove_utterance(self, utterance_id: int) -> UtteranceRecord:
        """Delete an utterance (audio and embeddings with it) and take it out of its
        speaker's centroid under every version, exactly (running sums allow removal).

        A centroid left empty is deleted; the speaker stays, with no profile.
        """
        with self._session(f"remove utterance {utterance_id}", write=True) as s:
            row = self._utterance_locked(s, utterance_id)
            record = _utterance_record(row, s.get(m.Speaker, row.speaker_id).name)
            if row.status == "enrolled":
                self._fold(s, row, -1, _now())
            s.execute(delete(m.Utterance).where(m.Utterance.id == utterance_id))
            return record

    def embedded_versions(self, utterance_id: int) -> list[int]:
        """The versions an utterance has an embedding under; InvalidInput if there is no such utterance."""
        with self._session(f"read the versions of utterance {utterance_id}") as s:
            if s.get(m.Utterance, utterance_id) is None:
                raise InvalidInput(f"no utterance {utterance_id}")
            return sorted(s.scalars(select(m.Embedding.version).where(m.Embedding.utterance_id == utterance_id)))

    @staticmethod
    def _utterance_locked(s: Session, utterance_id: int) -> m.Utterance:
        """The utterance row, its speaker's row locked (centroid read-modify-write follows)."""
        speaker_id = s.scalar(select(m.Utterance.speaker_id).where(m.Utterance.id == utterance_id))
        if speaker_id is None:
            raise InvalidInput(f"no utterance {utterance_id}")
        s.execute(select(m.Speaker.id).where(m.Speaker.id == speaker_id).with_for_update())
        return s.get(m.Utterance, utterance_id)

    @staticmethod
    def _fold(s: Session, row: m.Utterance, sign: int, now: datetime) -> None:
        """Add (+1) or remove (-1) each stored embedding of ``row`` to or from its version's centroid."""
        for version, vector in s.execute(
            select(m.Embedding.version, m.Embedding.vector).where(m.Embedding.utterance_id == row.id)
        ):
            centroid = s.get(m.Centroid, (row.speaker_id, version))
            vec = _from_f32(vector)
            if centroid is None:
                running = RunningCentroid(dim=vec.size)
            else:
                running = RunningCentroid(dim=centroid.dim, sum=_from_f64(centroid.sum), count=centroid.count)
            if sign > 0:
                running.learn_one(vec)
            else:
                running.remove_one(vec)
            if running.count == 0:
                s.execute(delete(m.Centroid).where(m.Centroid.speaker_id == row.speaker_id, m.Centroid.version == version))
            else:
                _write_centroid(s, row.speaker_id, version, running, now, exists=centroid is not None)

    @contextmanager
    def _version_checked(self, version: int) -> Iterator[None]:
        """Report a refused write as UnknownVersion when the version it names does not exist.

        The foreign keys already enforce the version; looking it up only after a failure
        keeps the enrollment hot path to the statements it needs.
        """
        try:
            yield
        except StorageError as exc:
            if not isinstance(exc, (DuplicateUtterance, VersionChanged)) and not self._version_exists(version):
                raise UnknownVersion(f"model version {version} does not exist") from None
            raise

    def _version_exists(self, number: int) -> bool:
        with self._session(f"look up model version {number}") as s:
            return s.get(m.ModelVersion, number) is not None

    # ------------------------------------------------- embeddings of a whole version

    def missing_embeddings(self, version: int) -> list[tuple[int, str]]:
        """``(utterance id, speaker)`` of every enrolled (not pending) utterance without an
        embedding at ``version``, by id."""
        with self._session(f"find utterances not embedded under version {version}") as s:
            return [(uid, name) for uid, name in s.execute(_missing_embeddings_query(version))]

    def add_embeddings(self, version: int, items: Sequence[tuple[int, np.ndarray]]) -> int:
        """Store embeddings of existing utterances under ``version`` and fold them into
        that version's centroids, in one transaction (re-embedding after a refresh, or
        catching a version up before a rollback).

        Utterances that already have an embedding at ``version``, or that were deleted
        meanwhile, are skipped, so a retry after a crash never counts one twice.
        Returns how many were added.
        """
        if not items:
            return 0
        vectors = {int(uid): np.asarray(vec, dtype=np.float32) for uid, vec in items}
        for uid, vec in vectors.items():
            if vec.ndim != 1 or not np.all(np.isfinite(vec)):
                raise ValueError(f"embedding of utterance {uid} must be a finite 1-D vector")
        with self._version_checked(version), self._session(f"store embeddings under version {version}", write=True) as s:
            present = set(
                s.scalars(
                    select(m.Embedding.utterance_id).where(
                        m.Embedding.version == version, m.Embedding.utterance_id.in_(vectors)
                    )
                )
            )
            owners = dict(
                s.execute(select(m.Utterance.id, m.Utterance.speaker_id).where(m.Utterance.id.in_(vectors))).all()
            )
            todo = [uid for uid in vectors if uid in owners and uid not in present]
            if not todo:
                return 0
            now = _now()
            s.execute(
                insert(m.Embedding),
                [{"utterance_id": uid, "version": version, "vector": _f32(vectors[uid]), "created_at": now} for uid in todo],
            )
            by_speaker: dict[int, list[int]] = {}
            for uid in todo:
                by_speaker.setdefault(owners[uid], []).append(uid)
            rows = {
                row.speaker_id: row
                for row in s.execute(
                    select(m.Centroid.speaker_id, m.Centroid.dim, m.Centroid.count, m.Centroid.sum)
                    .where(m.Centroid.version == version, m.Centroid.speaker_id.in_(by_speaker))
                    .with_for_update()
                )
            }
            for speaker_id, uids in by_speaker.items():
                row = rows.get(speaker_id)
                running = (
                    RunningCentroid(dim=row.dim, sum=_from_f64(row.sum), count=row.count)
                    if row is not None
                    else RunningCentroid(dim=vectors[uids[0]].size)
                )
                for uid in uids:
                    running.learn_one(vectors[uid])
                _write_centroid(s, speaker_id, version, running, now, exists=row is not None)
            return len(todo)

    def version_embeddings(self, version: int) -> tuple[np.ndarray, list[str], np.ndarray]:
        """The embedding at ``version`` of every enrolled (not pending) utterance: utterance
        ids (ascending), their speakers, and the float32 matrix [n, D]."""
        with self._session(f"read the embeddings of version {version}") as s:
            rows = s.execute(
                select(m.Embedding.utterance_id, m.Speaker.name, m.Embedding.vector)
                .join(m.Utterance, m.Utterance.id == m.Embedding.utterance_id)
                .join(m.Speaker, m.Speaker.id == m.Utterance.speaker_id)
                .where(m.Embedding.version == version, m.Utterance.status == "enrolled")
                .order_by(m.Embedding.utterance_id)
            ).all()
        if not rows:
            return np.zeros(0, dtype=np.int64), [], np.zeros((0, 0), dtype=np.float32)
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        return ids, [r[1] for r in rows], np.stack([_from_f32(r[2]) for r in rows])

    def audio_many(self, utterance_ids: Sequence[int]) -> dict[int, tuple[bytes, str, int]]:
        """The kept audio of several utterances: ``{id: (data, codec, sample_rate)}``;
        ids without audio (deleted meanwhile) are absent."""
        with self._session(f"read the audio of {len(utterance_ids)} utterances") as s:
            rows = s.execute(
                select(m.UtteranceAudio).where(m.UtteranceAudio.utterance_id.in_([int(i) for i in utterance_ids]))
            ).scalars()
            return {row.utterance_id: (row.data, row.codec, row.sample_rate) for row in rows}

    def discard_version_data(self, version: int) -> None:
        """Delete every embedding and centroid stored under ``version`` (an abandoned candidate)."""
        with self._session(f"discard the embeddings of version {version}", write=True) as s:
            s.execute(delete(m.Centroid).where(m.Centroid.version == version))
            s.execute(delete(m.Embedding).where(m.Embedding.version == version))
            s.execute(delete(m.Calibration).where(m.Calibration.version == version))

    def cohort_embeddings(
        self, version: int, *, per_speaker: int, through: int | None = None
    ) -> tuple[np.ndarray, list[str], np.ndarray]:
        """Up to ``per_speaker`` enrolled embeddings of every speaker at ``version`` (the
        oldest ones, which change least; utterance ids up to ``through`` when given), for
        a score-normalisation cohort: utterance ids, speakers, float32 matrix [n, D]."""
        rank = (
            func.row_number()
            .over(partition_by=m.Utterance.speaker_id, order_by=m.Utterance.id)
            .label("rank")
        )
        ranked = (
            select(m.Embedding.utterance_id, m.Speaker.name, m.Embedding.vector, rank)
            .join(m.Utterance, m.Utterance.id == m.Embedding.utterance_id)
            .join(m.Speaker, m.Speaker.id == m.Utterance.speaker_id)
            .where(m.Embedding.version == version, m.Utterance.status == "enrolled")
            .where(m.Utterance.id <= through if through is not None else True)
            .subquery()
        )
        with self._session(f"read the score cohort of version {version}") as s:
            rows = s.execute(
                select(ranked.c.utterance_id, ranked.c.name, ranked.c.vector)
                .where(ranked.c.rank <= per_speaker)
                .order_by(ranked.c.utterance_id)
            ).all()
        if not rows:
            return np.zeros(0, dtype=np.int64), [], np.zeros((0, 0), dtype=np.float32)
        return (
            np.array([r[0] for r in rows], dtype=np.int64),
            [r[1] for r in rows],
            np.stack([_from_f32(r[2]) for r in rows]),
        )

    # -------------------------------------------------------------- calibrations

    def add_calibration(self, version: int, params: dict) -> tuple[int, datetime]:
        """Store a calibration of ``version``; the newest one is the one in use."""
        with self._version_checked(version), self._session(f"store a calibration of version {version}", write=True) as s:
            now = _now()
            new_id = s.execute(
                insert(m.Calibration).returning(m.Calibration.id),
                {"version": version, "params": params, "created_at": now},
            ).scalar_one()
            return new_id, now

    def latest_calibration(self, version: int) -> tuple[int, datetime, dict] | None:
        """``(id, created_at, params)`` of the newest calibration of ``version``, or None."""
        with self._session(f"read the calibration of version {version}") as s:
            row = s.scalars(
                select(m.Calibration).where(m.Calibration.version == version).order_by(m.Calibration.id.desc()).limit(1)
            ).first()
            return None if row is None else (row.id, row.created_at, dict(row.params))

    # ------------------------------------------------------------- jobs and locks

    @contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """Hold the lock ``name`` across every process using this database, or raise
        :class:`RefreshBusy` at once if another holder has it.

        PostgreSQL: a session-level advisory lock on a dedicated connection. SQLite: an
        ``flock`` on a file beside the database. Both vanish with the process that holds
        them, so a killed refresh never leaves a stale lock behind.
        """
        if self._backend == "postgresql":
            key = zlib.crc32(name.encode())
            with self._translating(f"take the {name} lock"), self._write.connect() as conn:
                got = conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar()
                conn.commit()
                if not got:
                    raise RefreshBusy(f"another process holds the {name} lock (a {name} is running)")
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                    conn.commit()
        elif _in_memory(self._url):
            lock = _MEMORY_LOCKS.setdefault(name, threading.Lock())
            if not lock.acquire(blocking=False):
                raise RefreshBusy(f"another thread holds the {name} lock (a {name} is running)")
            try:
                yield
            finally:
                lock.release()
        else:
            path = Path(self._url.database).expanduser()
            fd = os.open(path.with_name(f"{path.name}.{name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise RefreshBusy(f"another process holds the {name} lock (a {name} is running)") from None
                yield
            finally:
                os.close(fd)  # closing releases the flock

    def queue_job(self, kind: str, reason: str) -> Job:
        """Ask for a job (e.g. a refresh requested by a drift signal); it runs later."""
        with self._session(f"queue a {kind} job", write=True) as s:
            row = m.Job(kind=kind, status="queued", reason=reason, result={}, requested_at=_now())
            s.add(row)
            s.flush()
            return _job_record(row)

    def start_job(self, kind: str, reason: str, *, owner: str) -> tuple[Job, list[Job]]:
        """Start a job of ``kind``; call it only while holding :meth:`exclusive` for it.

        Because the caller holds the lock, any job still marked running belongs to a
        process that died: it is marked failed, and the candidate version it left half
        built is rejected and its embeddings removed. The oldest queued request of this
        kind becomes the started job; later ones are marked skipped (covered by it).

        Returns the started job and the interrupted ones that were cleaned up.
        """
        with self._session(f"start a {kind} job", write=True) as s:
            now = _now()
            interrupted = _fail_interrupted(s, now)
            queued = list(
                s.scalars(select(m.Job).where(m.Job.kind == kind, m.Job.status == "queued").order_by(m.Job.id))
            )
            if queued:
                job, rest = queued[0], queued[1:]
                job.reason = reason if job.reason == reason else f"{job.reason}; {reason}"
            else:
                job, rest = m.Job(kind=kind, reason=reason, result={}, requested_at=now), []
                s.add(job)
            job.status, job.owner, job.started_at = "running", owner, now
            s.flush()
            for other in rest:
                other.status, other.finished_at, other.result = "skipped", now, {"covered_by": job.id}
            s.flush()
            return _job_record(job), [_job_record(j) for j in interrupted]

    def recover_interrupted_jobs(self) -> list[Job]:
        """Mark jobs left running by a process that died as failed (and reject the
        candidate each left half built); call it only while holding :meth:`exclusive`.

        A starting service calls this, so a job killed with its process reads as failed
        at once rather than when the next refresh starts.
        """
        with self._session("recover interrupted jobs", write=True) as s:
            return [_job_record(j) for j in _fail_interrupted(s, _now())]

    def update_job(
        self, job_id: int, *, status: str | None = None, version: int | None = None, result: dict | None = None
    ) -> Job:
        """Record progress or the outcome of a job; a finished status stamps ``finished_at``."""
        if status is not None and status not in m.JOB_STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(m.JOB_STATUSES)}")
        with self._session(f"update job {job_id}", write=True) as s:
            row = _job_row(s, job_id)
            if status is not None:
                row.status = status
                if status in FINISHED_JOB:
                    row.finished_at = _now()
            if version is not None:
                row.version = version
            if result is not None:
                row.result = result
            s.flush()
            return _job_record(row)

    def get_job(self, job_id: int) -> Job:
        with self._session(f"read job {job_id}") as s:
            return _job_record(_job_row(s, job_id))

    def list_jobs(self, *, limit: int = 20, status: str | None = None) -> list[Job]:
        """The newest ``limit`` jobs (optionally of one status), newest first."""
        with self._session("list jobs") as s:
            query = select(m.Job).order_by(m.Job.id.desc()).limit(limit)
            if status is not None:
                query = query.where(m.Job.status == status)
            return [_job_record(row) for row in s.scalars(query)]

    def count_utterances_after(self, utterance_id: int) -> int:
        """How many enrolled utterances have an id above ``utterance_id`` (came after it)."""
        with self._session("count new utterances") as s:
            return s.scalar(
                select(func.count())
                .select_from(m.Utterance)
                .where(m.Utterance.id > utterance_id, m.Utterance.status == "enrolled")
            )

    # --------------------------------------------------------------------- reads

    def speakers(self, name: str | None = None) -> list[SpeakerSummary]:
        """Every speaker (or only ``name``) with utterance count, total speech and pending
        count, sorted by name."""
        enrolled = m.Utterance.status == "enrolled"
        with self._session("list speakers") as s:
            query = (
                select(
                    m.Speaker.name,
                    func.count(m.Utterance.id).filter(enrolled),
                    func.coalesce(func.sum(m.Utterance.speech_s).filter(enrolled), 0.0),
                    m.Speaker.created_at,
                    func.count(m.Utterance.id).filter(m.Utterance.status == "pending"),
                )
                .outerjoin(m.Utterance)
                .group_by(m.Speaker.id)
            )
            if name is not None:
                query = query.where(m.Speaker.name == name)
            rows = s.execute(query)
            summaries = [SpeakerSummary(name, n, float(speech), at, pending) for name, n, speech, at, pending in rows]
        # Sorted here: database collations disagree on the order of names.
        return sorted(summaries, key=lambda summary: summary.name)

    def has_speaker(self, name: str) -> bool:
        with self._session(f"look up speaker {name!r}") as s:
            return s.scalar(select(m.Speaker.id).where(m.Speaker.name == name)) is not None

    def centroid(self, speaker: str, version: int) -> Centroid:
        """The centroid of ``speaker`` at ``version``.

        Raises
        ------
        UnknownSpeaker
            No such speaker, or the speaker has no centroid at ``version``.
        """
        with self._session(f"read the centroid of {speaker!r} at version {version}") as s:
            row = s.get(m.Centroid, (_speaker_id(s, speaker), version))
            if row is None:
                raise UnknownSpeaker(f"speaker {speaker!r} has no centroid at version {version}")
            total = _from_f64(row.sum)
            return Centroid(speaker, version, row.count, total, total / row.count)

    def centroid_matrix(self, version: int) -> tuple[list[str], np.ndarray]:
        """Speaker names (sorted) and their centroid means at ``version``, float32 [N, D].

        ``([], array of shape (0, 0))`` when no speaker has a centroid at ``version``.
        """
        with self._session(f"read the centroids of version {version}") as s:
            rows = sorted(
                s.execute(
                    select(m.Speaker.name, m.Centroid.mean)
                    .join(m.Centroid)
                    .where(m.Centroid.version == version)
                )
            )
        if not rows:
            return [], np.zeros((0, 0), dtype=np.float32)
        return [name for name, _ in rows], np.stack([_from_f32(mean) for _, mean in rows])

    def embeddings(self, speaker: str, version: int) -> np.ndarray:
        """The embeddings at ``version`` of ``speaker``'s enrolled utterances, float32 [n, D], by id."""
        with self._session(f"read the embeddings of {speaker!r} at version {version}") as s:
            vectors = s.scalars(
                select(m.Embedding.vector)
                .join(m.Utterance)
                .where(m.Utterance.speaker_id == _speaker_id(s, speaker), m.Utterance.status == "enrolled")
                .where(m.Embedding.version == version)
                .order_by(m.Utterance.id)
            ).all()
        if not vectors:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([_from_f32(v) for v in vectors])

    def utterances(self, speaker: str | None = None, *, status: str | None = "enrolled") -> list[UtteranceRecord]:
        """Utterances of ``speaker`` (every speaker when None) with ``status`` ("enrolled",
        "pending", None for both), by id; audio is not loaded."""
        with self._session("list utterances") as s:
            query = select(m.Utterance, m.Speaker.name).join(m.Speaker).order_by(m.Utterance.id)
            if speaker is not None:
                query = query.where(m.Utterance.speaker_id == _speaker_id(s, speaker))
            if status is not None:
                query = query.where(m.Utterance.status == status)
            return [_utterance_record(u, name) for u, name in s.execute(query)]

    def utterance_audio(self, utterance_id: int) -> tuple[bytes, str, int]:
        """The kept speech audio of an utterance: ``(data, codec, sample_rate)``."""
        with self._session(f"read the audio of utterance {utterance_id}") as s:
            row = s.get(m.UtteranceAudio, utterance_id)
            if row is None:
                raise StorageError(f"no audio stored for utterance {utterance_id}")
            return row.data, row.codec, row.sample_rate

    # ------------------------------------------------------- erasure, keys, audit

    def erase_speaker(self, name: str, *, actor: str) -> dict[str, Any]:
        """Delete everything stored about a speaker, in one transaction: the kept audio
        or features, every utterance (held ones too), its embeddings under every version,
        its centroids and the speaker row. Replay draws from stored utterances, so
        nothing of theirs can be replayed afterwards.

        The audit log records that an erasure happened, with counts, but not the name.
        On SQLite the freed pages are zeroed (``secure_delete``) and the write-ahead log is
        truncated, so the bytes leave the database files too.

        Returns the counts and ``trained_into``: versions whose training may have seen
        the speaker's utterances (their weights are not changed by an erasure).

        Raises
        ------
        UnknownSpeaker
            No such speaker (nothing is written, not even to the audit log).
        """
        with self._session("erase a speaker", write=True) as s:
            speaker_id = s.scalar(select(m.Speaker.id).where(m.Speaker.name == name).with_for_update())
            if speaker_id is None:
                raise UnknownSpeaker(f"speaker {name!r} is not enrolled")
            ids = select(m.Utterance.id).where(m.Utterance.speaker_id == speaker_id).scalar_subquery()
            first = s.scalar(select(func.min(m.Utterance.id)).where(m.Utterance.speaker_id == speaker_id))
            trained_into = [] if first is None else sorted(
                s.scalars(
                    select(m.ModelVersion.number).where(
                        m.ModelVersion.parent.is_not(None), m.ModelVersion.trained_through >= first
                    )
                )
            )
            s.execute(delete(m.UtteranceAudio).where(m.UtteranceAudio.utterance_id.in_(ids)))
            counts = {
                "embeddings": s.execute(delete(m.Embedding).where(m.Embedding.utterance_id.in_(ids))).rowcount,
                "centroids": s.execute(delete(m.Centroid).where(m.Centroid.speaker_id == speaker_id)).rowcount,
                "utterances": s.execute(delete(m.Utterance).where(m.Utterance.speaker_id == speaker_id)).rowcount,
            }
            s.execute(delete(m.Speaker).where(m.Speaker.id == speaker_id))
            s.add(m.AuditEntry(action="erase_speaker", actor=actor, detail=counts, at=_now()))
        return {**counts, "trained_into": trained_into, "files_scrubbed": self._truncate_wal()}

    def _truncate_wal(self) -> bool:
        """Copy the write-ahead log into the database and empty it, so that page images
        from before a delete do not linger in it; False when readers kept it from
        finishing (the log is then emptied at a later checkpoint)."""
        if self._backend != "sqlite" or _in_memory(self._url):
            return self._backend == "sqlite"
        # On the raw connection: a checkpoint cannot run inside the transaction that
        # SQLAlchemy would begin.
        connection = self._write.raw_connection()
        try:
            busy, _, _ = connection.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            return busy == 0
        except Exception as exc:  # the erasure itself is committed; report, don't undo
            log.warning("erasure committed, but the write-ahead log was not truncated: %s", exc)
            return False
        finally:
            connection.close()

    def add_key(self, *, prefix: str, digest: str, role: str, note: str, actor: str) -> ApiKey:
        """Store an API key's digest (never the key) with its role."""
        if role not in m.KEY_ROLES:
            raise InvalidInput(f"role {role!r}; valid: {', '.join(m.KEY_ROLES)}")
        with self._session("store an API key", write=True) as s:
            row = m.ApiKey(prefix=prefix, digest=digest, role=role, note=note, created_at=_now())
            s.add(row)
            s.flush()
            s.add(m.AuditEntry(action="create_key", actor=actor, detail={"key": row.id, "role": role}, at=row.created_at))
            return _key_record(row)

    def key_by_digest(self, digest: str) -> ApiKey | None:
        """The live (not revoked) key with this digest, or None."""
        with self._session("look up an API key") as s:
            row = s.scalars(select(m.ApiKey).where(m.ApiKey.digest == digest, m.ApiKey.revoked_at.is_(None))).first()
            return None if row is None else _key_record(row)

    def list_keys(self) -> list[ApiKey]:
        with self._session("list API keys") as s:
            return [_key_record(row) for row in s.scalars(select(m.ApiKey).order_by(m.ApiKey.id))]

    def revoke_key(self, key_id: int, *, actor: str) -> ApiKey:
        with self._session(f"revoke API key {key_id}", write=True) as s:
            row = s.get(m.ApiKey, key_id)
            if row is None:
                raise InvalidInput(f"no API key {key_id}")
            if row.revoked_at is None:
                row.revoked_at = _now()
                s.add(m.AuditEntry(action="revoke_key", actor=actor, detail={"key": key_id}, at=row.revoked_at))
            s.flush()
            return _key_record(row)

    def erasures(self) -> int:
        """How many erasures have happened: processes caching embeddings (the AS-norm
        cohort) compare this to know when to drop what they hold."""
        with self._session("count erasures") as s:
            return s.scalar(select(func.count()).select_from(m.AuditEntry).where(m.AuditEntry.action == "erase_speaker"))

    def audit_log(self, limit: int = 100) -> list[AuditEntry]:
        """The newest ``limit`` audit entries, newest first."""
        with self._session("read the audit log") as s:
            rows = s.scalars(select(m.AuditEntry).order_by(m.AuditEntry.id.desc()).limit(limit))
            return [AuditEntry(r.id, r.action, r.actor, dict(r.detail), r.at) for r in rows]

    def counts(self) -> dict[str, int]:
        """Rows per table, by table name."""
        with self._session("count rows") as s:
            return {
                table.name: s.scalar(select(func.count()).select_from(table))
                for table in m.Base.metadata.sorted_tables
            }

    def scheduler_jobstore(self, tablename: str = "apscheduler_jobs") -> Any:
        """An APScheduler job store in this database, on this store's write engine.

        Sharing the engine gives the scheduler's writes the same SQLite settings (busy
        timeout, BEGIN IMMEDIATE) as ours, so the two never trip over each other's locks.
        The table is APScheduler's own; Alembic leaves it alone (see migrations/env.py).
        """
        from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore

        return SQLAlchemyJobStore(engine=self._write, tablename=tablename)

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _session(self, doing: str, *, write: bool = False) -> Iterator[Session]:
        """One transaction: commit on success, roll back on any error, always close.

        ``doing`` completes "cannot ..." in error messages.
        """
        session = (self._write_sessions if write else self._read_sessions)()
        try:
            with self._translating(doing), session.begin():
                yield session
        finally:
            session.close()

    @contextmanager
    def _translating(self, doing: str) -> Iterator[None]:
        """Turn SQLAlchemy and Alembic errors into :class:`StorageError` subclasses.

        The project's own exceptions pass through unchanged.
        """
        try:
            yield
        except SQLAlchemyError as exc:
            if isinstance(exc, IntegrityError) and _is_duplicate_utterance(exc):
                raise DuplicateUtterance(
                    f"cannot {doing}: this audio content is already enrolled for the speaker"
                ) from exc
            reason = _first_line(getattr(exc, "orig", None) or exc)
            raise StorageError(f"cannot {doing} ({self.url}): {reason}") from exc
        except CommandError as exc:
            raise StorageError(f"cannot {doing}: {exc}") from exc

    def _alembic_config(self, session: Session | None = None) -> Config:
        config = Config()
        config.set_main_option("script_location", str(Path(migrations.__file__).parent))
        # ConfigParser interpolates %, which URL-encoded passwords contain.
        url = self._url.render_as_string(hide_password=False)
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
        if session is not None:
            # env.py migrates on this connection, inside this session's transaction.
            config.attributes["connection"] = session.connection()
        return config


def _sqlite_engine(url: URL, *, echo: bool, begin: str) -> Engine:
    """A SQLite engine whose transactions start with ``begin``.

    Writers use BEGIN IMMEDIATE: a deferred transaction that reads and then writes must
    upgrade its lock, and two processes doing so at once deadlock ("database is locked")
    where busy_timeout cannot help. Following SQLAlchemy's documented recipe, pysqlite's
    own transaction handling is switched off and SQLAlchemy emits the BEGIN.
    """
    options: dict[str, Any] = {}
    if _in_memory(url):
        options = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
    engine = create_engine(url, echo=echo, **options)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        # Deleted rows are overwritten with zeros, not left in free pages: voiceprints
        # are biometric data, and an erased speaker must not be recoverable from the file.
        cursor.execute("PRAGMA secure_delete = ON")
        # WAL: readers never block the writer and the writer never blocks readers.
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql(begin)

    return engine


def _in_memory(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or url.query.get("mode") == "memory"


def _insert_ignoring_conflict(session: Session, table: Table, values: dict[str, Any]) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING; True when the row was inserted."""
    insert = _INSERTS[session.get_bind().dialect.name]
    statement = insert(table).values(**values).on_conflict_do_nothing()
    # RETURNING rather than rowcount: SQLAlchemy adds an implicit RETURNING on PostgreSQL,
    # after which the driver reports rowcount -1.
    inserted = session.execute(statement.returning(*table.primary_key.columns)).first()
    return inserted is not None


def _is_duplicate_utterance(exc: IntegrityError) -> bool:
    message = str(exc.orig)
    # PostgreSQL names the constraint; SQLite lists its columns.
    return (
        m.UTTERANCE_CONTENT_UNIQUE in message
        or "utterances.speaker_id, utterances.content_sha256" in message
    )


def _first_line(error: object) -> str:
    # PostgreSQL appends DETAIL/HINT lines; the first line reads well on its own.
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _now() -> datetime:
    return datetime.now(UTC)


def _version_row(session: Session, number: int) -> m.ModelVersion:
    row = session.get(m.ModelVersion, number)
    if row is None:
        raise UnknownVersion(f"model version {number} does not exist")
    return row


def _alias_target(session: Session, alias: str) -> int | None:
    return session.scalar(select(m.Alias.version).where(m.Alias.name == alias))


def _write_centroid(
    session: Session, speaker_id: int, version: int, running: RunningCentroid, now: datetime, *, exists: bool
) -> None:
    """Insert or update one centroid row from its running statistics."""
    values = {"count": running.count, "sum": _f64(running.sum), "mean": _f32(running.mean), "updated_at": now}
    if exists:
        session.execute(
            update(m.Centroid)
            .where(m.Centroid.speaker_id == speaker_id, m.Centroid.version == version)
            .values(**values)
        )
    else:
        session.execute(insert(m.Centroid), {"speaker_id": speaker_id, "version": version, "dim": running.dim, **values})


def _profile_speech(session: Session, speaker_id: int) -> float:
    """Seconds of speech in a speaker's profile (its enrolled utterances)."""
    total = session.scalar(
        select(func.sum(m.Utterance.speech_s)).where(
            m.Utterance.speaker_id == speaker_id, m.Utterance.status == "enrolled"
        )
    )
    return float(total or 0.0)


def _missing_embeddings_query(version: int):
    embedded = select(m.Embedding.utterance_id).where(m.Embedding.version == version)
    return (
        select(m.Utterance.id, m.Speaker.name)
        .join(m.Speaker)
        .where(m.Utterance.id.not_in(embedded), m.Utterance.status == "enrolled")
        .order_by(m.Utterance.id)
    )


def _fail_interrupted(s: Session, now: datetime) -> list[m.Job]:
    """Jobs marked running while the caller holds the job lock belong to dead processes
    (every kind: refreshes and rollbacks share one lock)."""
    interrupted = list(s.scalars(select(m.Job).where(m.Job.status == "running")))
    for job in interrupted:
        job.status, job.finished_at = "failed", now
        job.result = {**job.result, "error": "interrupted: the process running it stopped"}
        if job.version is not None:
            version = s.get(m.ModelVersion, job.version)
            if version is not None and version.status == "candidate":
                version.status, version.note = "rejected", "interrupted before promotion"
                s.execute(delete(m.Centroid).where(m.Centroid.version == job.version))
                s.execute(delete(m.Embedding).where(m.Embedding.version == job.version))
    s.flush()
    return interrupted


def _job_row(session: Session, job_id: int) -> m.Job:
    row = session.get(m.Job, job_id)
    if row is None:
        raise InvalidInput(f"no job {job_id}")
    return row


def _key_record(row: m.ApiKey) -> ApiKey:
    return ApiKey(row.id, row.prefix, row.role, row.note, row.created_at, row.revoked_at)


def _job_record(row: m.Job) -> Job:
    return Job(
        id=row.id,
        kind=row.kind,
        status=row.status,
        reason=row.reason,
        owner=row.owner,
        version=row.version,
        result=dict(row.result or {}),
        requested_at=row.requested_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
    )


def _speaker_id(session: Session, name: str) -> int:
    speaker_id = session.scalar(select(m.Speaker.id).where(m.Speaker.name == name))
    if speaker_id is None:
        raise UnknownSpeaker(f"no speaker named {name!r}")
    return speaker_id


def _version_record(row: m.ModelVersion, active_number: int | None) -> ModelVersion:
    return ModelVersion(
        number=row.number,
        parent=row.parent,
        status=row.status,
        encoder=row.encoder,
        config=row.config,
        checkpoint=row.checkpoint,
        checkpoint_sha256=row.checkpoint_sha256,
        metrics=row.metrics,
        note=row.note,
        created_at=row.created_at,
        active=row.number == active_number,
        trained_through=row.trained_through,
    )


def _utterance_record(row: m.Utterance, speaker: str) -> UtteranceRecord:
    return UtteranceRecord(
        id=row.id,
        speaker=speaker,
        source=row.source,
        content_sha256=row.content_sha256,
        duration_s=row.duration_s,
        speech_s=row.speech_s,
        quality=row.quality,
        created_at=row.created_at,
        status=row.status,
    )


def _f32(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def _f64(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f8").tobytes()


def _from_f32(data: bytes) -> np.ndarray:
    # astype copies: frombuffer views are read-only and may be non-native byte order.
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def _from_f64(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f8").astype(np.float64)
