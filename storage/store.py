"""The only code that talks SQL.

:class:`Store` wraps SQLite (the embedded default) or PostgreSQL and returns the frozen
records of :mod:`storage.records`. Every public method runs in one managed session that
commits, rolls back and closes, and turns SQLAlchemy errors into the project's own.
"""

from __future__ import annotations

from collections.abc import Iterator
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
from sqlalchemy import Engine, Table, create_engine, event, func, insert, select, text, update
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
    NotInitialised,
    SchemaOutdated,
    StorageError,
    UnknownSpeaker,
    UnknownVersion,
)
from storage import models as m
from storage.records import (
    AliasMove,
    Centroid,
    Enrollment,
    ModelVersion,
    SpeakerSummary,
    UtteranceRecord,
)

ACTIVE = "active"
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
    ) -> ModelVersion:
        """Record a new model version, numbered one past the highest so far."""
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

    def set_alias(self, alias: str, version: int, *, actor: str, reason: str) -> None:
        """Point ``alias`` at ``version`` and append the move to the alias history.

        Moving "active" also marks the new version active and the one it replaces
        retired, in the same transaction.
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
    ) -> Enrollment:
        """Store one utterance of ``speaker`` and fold its embedding into the centroid.

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
            running.learn_one(vector)
            values = {
                "count": running.count,
                "sum": _f64(running.sum),
                "mean": _f32(running.mean),
                "updated_at": now,
            }
            if centroid is None:
                s.execute(insert(m.Centroid), {"speaker_id": speaker_id, "version": version, "dim": running.dim, **values})
            else:
                s.execute(
                    update(m.Centroid)
                    .where(m.Centroid.speaker_id == speaker_id, m.Centroid.version == version)
                    .values(**values)
                )
            record = UtteranceRecord(
                id=utterance_id,
                speaker=speaker,
                source=source,
                content_sha256=content_sha256,
                duration_s=duration_s,
                speech_s=speech_s,
                quality=dict(quality),
                created_at=now,
            )
            return Enrollment(
                utterance=record,
                version=version,
                count=running.count,
                previous_mean=previous_mean,
                mean=running.mean,
            )

    @contextmanager
    def _version_checked(self, version: int) -> Iterator[None]:
        """Report a refused write as UnknownVersion when the version it names does not exist.

        The foreign keys already enforce the version; looking it up only after a failure
        keeps the enrollment hot path to the statements it needs.
        """
        try:
            yield
        except StorageError as exc:
            if not isinstance(exc, DuplicateUtterance) and not self._version_exists(version):
                raise UnknownVersion(f"model version {version} does not exist") from None
            raise

    def _version_exists(self, number: int) -> bool:
        with self._session(f"look up model version {number}") as s:
            return s.get(m.ModelVersion, number) is not None

    # --------------------------------------------------------------------- reads

    def speakers(self) -> list[SpeakerSummary]:
        """Every speaker with utterance count and total speech, sorted by name."""
        with self._session("list speakers") as s:
            rows = s.execute(
                select(
                    m.Speaker.name,
                    func.count(m.Utterance.id),
                    func.coalesce(func.sum(m.Utterance.speech_s), 0.0),
                    m.Speaker.created_at,
                )
                .outerjoin(m.Utterance)
                .group_by(m.Speaker.id)
            )
            summaries = [SpeakerSummary(name, n, float(speech), at) for name, n, speech, at in rows]
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
        """The stored embeddings of ``speaker`` at ``version``, float32 [n, D], by utterance id."""
        with self._session(f"read the embeddings of {speaker!r} at version {version}") as s:
            vectors = s.scalars(
                select(m.Embedding.vector)
                .join(m.Utterance)
                .where(m.Utterance.speaker_id == _speaker_id(s, speaker))
                .where(m.Embedding.version == version)
                .order_by(m.Utterance.id)
            ).all()
        if not vectors:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([_from_f32(v) for v in vectors])

    def utterances(self, speaker: str | None = None) -> list[UtteranceRecord]:
        """Utterances of ``speaker`` (every speaker when None), by id; audio is not loaded."""
        with self._session("list utterances") as s:
            query = select(m.Utterance, m.Speaker.name).join(m.Speaker).order_by(m.Utterance.id)
            if speaker is not None:
                query = query.where(m.Utterance.speaker_id == _speaker_id(s, speaker))
            return [_utterance_record(u, name) for u, name in s.execute(query)]

    def utterance_audio(self, utterance_id: int) -> tuple[bytes, str, int]:
        """The kept speech audio of an utterance: ``(data, codec, sample_rate)``."""
        with self._session(f"read the audio of utterance {utterance_id}") as s:
            row = s.get(m.UtteranceAudio, utterance_id)
            if row is None:
                raise StorageError(f"no audio stored for utterance {utterance_id}")
            return row.data, row.codec, row.sample_rate

    def counts(self) -> dict[str, int]:
        """Rows per table, by table name."""
        with self._session("count rows") as s:
            return {
                table.name: s.scalar(select(func.count()).select_from(table))
                for table in m.Base.metadata.sorted_tables
            }

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
