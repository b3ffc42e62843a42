"""Speakers and their utterances: enrollment, review, removal, erasure and profile reads."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import delete, func, insert, select
from sqlalchemy.orm import Session

from voiceprint.engine.centroids import RunningCentroid
from voiceprint.engine.errors import DuplicateUtterance, InvalidInput, StorageError, UnknownSpeaker, UnknownUtterance
from voiceprint.storage import db, feed, ids
from voiceprint.storage import models as m
from voiceprint.storage.records import Centroid, CentroidChanges, Enrollment, SpeakerSummary, UtteranceRecord
from voiceprint.storage.registry import ACTIVE, require_active
from voiceprint.storage.scrub import ERASURE, Scrub
from voiceprint.storage.unlabeled import take_unlabeled
from voiceprint.storage.vectors import f32, fold, from_f32, running_centroid, save_centroid


class Profiles:
    """Each speaker's utterances (with their kept audio and embeddings) and centroids."""

    def __init__(self, database: db.Database, scrub: Scrub):
        self._db, self._scrub = database, scrub

    # Over 60 lines only through its fourteen keywords and their docstring (the body is ~40):
    # one call writes one utterance, so its fields stay plain keywords.
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
        consistency_cut: float | None = None,
        consistency_min_count: int = 1,
        forced_by: str | None = None,
        duplicate_cut: float | None = None,
        unlabeled_id: int | None = None,
    ) -> Enrollment:
        """Store one utterance of ``speaker`` and fold its embedding into the centroid.

        An embedding whose cosine to the centroid falls below ``consistency_cut``, once
        the profile holds ``consistency_min_count`` utterances, is kept *pending*: stored
        with its embedding, but outside the centroid until :meth:`accept_utterance`. The
        check reads the centroid inside the transaction, with the speaker's row locked, so
        a concurrent enrollment cannot change the profile it is judged against.

        ``forced_by`` names who skipped the checks (a forced enrollment): the audit log
        records it in the same transaction, with the utterance id but not the name.

        ``duplicate_cut``: an embedding this close (cosine) to one of the speaker's stored
        utterances at ``version``, held ones included, is the same recording in another
        encoding, refused like identical bytes.

        ``unlabeled_id``: the utterance was stored unlabeled under this id (a named
        cluster's member); that row and its embeddings are deleted in this transaction, so
        the utterance moves exactly once (:class:`UnknownUtterance` if it is gone).

        With ``expect_active``, ``version`` must still be the active version when the
        transaction runs, else :class:`VersionChanged` is raised and nothing is stored:
        an utterance embedded for a version that was just replaced would otherwise be
        missing from the new one.

        Speaker (created on first use), utterance, audio, embedding and centroid are
        written in one transaction: on any failure nothing is stored.

        Returns
        -------
        Enrollment
            The stored utterance, the centroid mean before and after it, and its cosine
            to the mean before it.

        Raises
        ------
        DuplicateUtterance
            The speaker already has an utterance with this ``content_sha256``, or one
            within ``duplicate_cut``.
        UnknownVersion
            No model version ``version``.
        ValueError
            ``embedding`` is not a finite vector of the dimension stored at ``version``.
        """
        vector = np.asarray(embedding, dtype=np.float32)
        if vector.ndim != 1 or not np.all(np.isfinite(vector)):
            raise ValueError(f"embedding must be a finite 1-D vector, got shape {vector.shape}")
        fields = {
            "source": source,
            "content_sha256": content_sha256,
            "duration_s": duration_s,
            "speech_s": speech_s,
            "quality": quality,
        }
        doing = f"enroll {source!r} for speaker {speaker!r}"
        with self._db.version_checked(version), self._db.session(doing, write=True) as s:
            if expect_active:
                require_active(s, version)
            if unlabeled_id is not None:
                take_unlabeled(s, unlabeled_id)
            now = db.now()
            speaker_id = _locked_speaker(s, speaker, now)
            if duplicate_cut is not None:
                _refuse_same_recording(s, speaker_id, version, vector, duplicate_cut, doing)
            running, exists = _profile_centroid(s, speaker_id, version, vector.size)
            admitted, similarity = running.admits(vector, consistency_cut, consistency_min_count)
            previous_mean = running.mean if exists else None
            status = "enrolled" if admitted else "pending"
            utterance_id = _insert_utterance(
                s, speaker_id, version, fields, status, vector, (audio, codec, sample_rate), now
            )
            if admitted:
                save_centroid(s, speaker_id, version, running.learn_one(vector), now, exists=exists)
            if forced_by is not None:
                s.add(m.AuditEntry(action="forced_enrollment", actor=forced_by, detail={"utterance": utterance_id}, at=now))
            record = UtteranceRecord(
                id=utterance_id, speaker=speaker, **(fields | {"quality": dict(quality)}), created_at=now, status=status
            )
            return Enrollment(
                utterance=record,
                version=version,
                count=running.count,
                previous_mean=previous_mean,
                mean=running.mean if running.count else None,
                speech_s=_profile_speech(s, speaker_id),
                similarity_before=similarity,
            )

    def accept_utterance(
        self, utterance_id: int, embeddings: dict[int, np.ndarray] | None = None, *, actor: str = "system"
    ) -> UtteranceRecord:
        """Move a pending utterance into its speaker's profile.

        ``embeddings`` ({version: vector}) adds embeddings it lacks (the active version
        may have changed since it was held). Every embedding it has is folded into that
        version's centroid, in one transaction.

        Raises
        ------
        UnknownUtterance
            No such utterance.
        InvalidInput
            It is not held for review.
        """
        with self._db.session(f"accept utterance {utterance_id}", write=True) as s:
            row = _utterance_locked(s, utterance_id)
            if row.status != "pending":
                raise InvalidInput(f"utterance {utterance_id} is not held for review")
            now = db.now()
            for version, vector in (embeddings or {}).items():
                db.insert_ignoring_conflict(
                    s,
                    m.Embedding.__table__,
                    {"utterance_id": utterance_id, "version": version, "vector": f32(vector), "created_at": now},
                )
            fold(s, row, +1, now)
            row.status = "enrolled"
            s.add(m.AuditEntry(action="accept_utterance", actor=actor, detail={"utterance": utterance_id}, at=now))
            return _utterance_record(row, s.get(m.Speaker, row.speaker_id).name)

    def remove_utterance(self, utterance_id: int, *, actor: str = "system") -> UtteranceRecord:
        """Delete an utterance (audio and embeddings with it) and take it out of its
        speaker's centroid under every version, exactly (running sums allow removal).

        A centroid left empty is deleted; the speaker stays, with no profile.
        """
        with self._db.session(f"remove utterance {utterance_id}", write=True) as s:
            row = _utterance_locked(s, utterance_id)
            record = _utterance_record(row, s.get(m.Speaker, row.speaker_id).name)
            if row.status == "enrolled":
                fold(s, row, -1, db.now())
            s.execute(delete(m.Utterance).where(m.Utterance.id == utterance_id))
            s.add(m.AuditEntry(action="remove_utterance", actor=actor, detail={"utterance": utterance_id}, at=db.now()))
            return record

    def embedded_versions(self, utterance_id: int) -> list[int]:
        """The versions an utterance has an embedding under; UnknownUtterance if there is no such utterance."""
        with self._db.session(f"read the versions of utterance {utterance_id}") as s:
            if ids.get(s, m.Utterance, utterance_id) is None:
                raise UnknownUtterance(f"no utterance {utterance_id}")
            return sorted(s.scalars(select(m.Embedding.version).where(m.Embedding.utterance_id == utterance_id)))

    def speakers(self, name: str | None = None) -> list[SpeakerSummary]:
        """Every speaker (or only ``name``) with utterance count, total speech and pending
        count, sorted by name."""
        enrolled = m.Utterance.status == "enrolled"
        with self._db.session("list speakers") as s:
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
        with self._db.session(f"look up speaker {name!r}") as s:
            return s.scalar(select(m.Speaker.id).where(m.Speaker.name == name)) is not None

    def centroid(self, speaker: str, version: int) -> Centroid:
        """The centroid of ``speaker`` at ``version``.

        Raises
        ------
        UnknownSpeaker
            No such speaker, or the speaker has no centroid at ``version``.
        """
        with self._db.session(f"read the centroid of {speaker!r} at version {version}") as s:
            row = s.get(m.Centroid, (_speaker_id(s, speaker), version))
            if row is None:
                raise UnknownSpeaker(f"speaker {speaker!r} has no centroid at version {version}")
            running = running_centroid(row)
            return Centroid(speaker, version, running.count, running.sum, running.mean)

    def centroid_changes(self, version: int, since: int = -1) -> CentroidChanges:
        """``version``'s centroids written after feed revision ``since`` (all of them from
        -1) and the speakers whose centroid was deleted since: one indexed read."""
        with self._db.session(f"read the centroid changes of version {version}") as s:
            now, rows, removed = feed.changes(s, version, since)
        means = np.stack([from_f32(r[2]) for r in rows]) if rows else np.zeros((0, 0), dtype=np.float32)
        return CentroidChanges(now, np.array([r[0] for r in rows], dtype=np.int64), [r[1] for r in rows], means, removed)

    def centroid_revision(self) -> int:
        """The change feed's revision: bumped by every committed centroid change."""
        with self._db.session("read the centroid feed") as s:
            return feed.current(s)

    def centroid_matrix(self, version: int) -> tuple[list[str], np.ndarray]:
        """Speaker names (sorted) and their centroid means at ``version``, float32 [N, D].

        ``([], array of shape (0, 0))`` when no speaker has a centroid at ``version``.
        """
        with self._db.session(f"read the centroids of version {version}") as s:
            rows = sorted(
                s.execute(
                    select(m.Speaker.name, m.Centroid.mean)
                    .join(m.Centroid)
                    .where(m.Centroid.version == version)
                )
            )
        if not rows:
            return [], np.zeros((0, 0), dtype=np.float32)
        return [name for name, _ in rows], np.stack([from_f32(mean) for _, mean in rows])

    def embeddings(self, speaker: str, version: int) -> np.ndarray:
        """The embeddings at ``version`` of ``speaker``'s enrolled utterances, float32 [n, D], by id."""
        with self._db.session(f"read the embeddings of {speaker!r} at version {version}") as s:
            vectors = s.scalars(
                select(m.Embedding.vector)
                .join(m.Utterance)
                .where(m.Utterance.speaker_id == _speaker_id(s, speaker), m.Utterance.status == "enrolled")
                .where(m.Embedding.version == version)
                .order_by(m.Utterance.id)
            ).all()
        if not vectors:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([from_f32(v) for v in vectors])

    def utterances(self, speaker: str | None = None, *, status: str | None = "enrolled") -> list[UtteranceRecord]:
        """Utterances of ``speaker`` (every speaker when None) with ``status`` ("enrolled",
        "pending", None for both), by id; audio is not loaded."""
        with self._db.session("list utterances") as s:
            query = select(m.Utterance, m.Speaker.name).join(m.Speaker).order_by(m.Utterance.id)
            if speaker is not None:
                query = query.where(m.Utterance.speaker_id == _speaker_id(s, speaker))
            if status is not None:
                query = query.where(m.Utterance.status == status)
            return [_utterance_record(u, name) for u, name in s.execute(query)]

    def utterance_audio(self, utterance_id: int) -> tuple[bytes, str, int]:
        """The kept speech audio of an utterance: ``(data, codec, sample_rate)``."""
        with self._db.session(f"read the audio of utterance {utterance_id}") as s:
            row = ids.get(s, m.UtteranceAudio, utterance_id)
            if row is None and ids.get(s, m.Utterance, utterance_id) is None:
                raise UnknownUtterance(f"no utterance has id {utterance_id}")
            if row is None:
                raise StorageError(f"no audio stored for utterance {utterance_id}")
            return row.data, row.codec, row.sample_rate

    def count_speakers(self, version: int, *, at_least: int = 1) -> int:
        """How many speakers have a centroid of ``at_least`` utterances or more at ``version``
        (one count over the centroids' primary key: cheap enough for every worker tick)."""
        with self._db.session(f"count the speakers of version {version}") as s:
            return s.scalar(
                select(func.count())
                .select_from(m.Centroid)
                .where(m.Centroid.version == version, m.Centroid.count >= at_least)
            )

    def count_utterances_after(self, utterance_id: int) -> int:
        """How many enrolled utterances have an id above ``utterance_id`` (came after it)."""
        with self._db.session("count new utterances") as s:
            return s.scalar(
                select(func.count())
                .select_from(m.Utterance)
                .where(m.Utterance.id > utterance_id, m.Utterance.status == "enrolled")
            )

    def erase_speaker(self, name: str, *, actor: str) -> dict[str, Any]:
        """Delete everything stored about a speaker, in one transaction: the kept audio
        or features, every utterance (held ones too), its embeddings under every version,
        its centroids and the speaker row. Replay draws from stored utterances, so
        nothing of theirs can be replayed afterwards.

        The audit log records that an erasure happened, with counts, but not the name.
        On SQLite the freed pages are zeroed (``secure_delete``) and the write-ahead log is
        truncated, so the bytes leave the database files too; a reader holding an older
        snapshot delays that (``files_scrubbed`` False, ``scrub`` "pending", retried: see
        :mod:`voiceprint.storage.scrub`).

        Returns the counts; ``trained_into``, versions whose training may have seen the
        speaker's utterances (their weights are not changed by an erasure); and
        ``running_refresh``, the refresh jobs running meanwhile, which may have loaded
        them: such a refresh does not promote a candidate trained on them, it deletes its
        weights (see :meth:`voiceprint.storage.registry.Registry.set_alias`, ``require_trained``).

        Raises
        ------
        UnknownSpeaker
            No such speaker (nothing is written, not even to the audit log).
        """
        with self._db.session("erase a speaker", write=True) as s:
            # The share lock a promotion's alias move waits for (PostgreSQL; SQLite writers
            # queue anyway): a candidate is promoted before this erasure, and then listed
            # in trained_into, or checks its training data after it.
            s.execute(select(m.Alias.version).where(m.Alias.name == ACTIVE).with_for_update(read=True))
            speaker_id = s.scalar(select(m.Speaker.id).where(m.Speaker.name == name).with_for_update())
            if speaker_id is None:
                raise UnknownSpeaker(f"speaker {name!r} is not enrolled")
            trained_into = _trained_into(s, speaker_id)
            ids = select(m.Utterance.id).where(m.Utterance.speaker_id == speaker_id).scalar_subquery()
            s.execute(delete(m.UtteranceAudio).where(m.UtteranceAudio.utterance_id.in_(ids)))
            counts = {
                "embeddings": s.execute(delete(m.Embedding).where(m.Embedding.utterance_id.in_(ids))).rowcount,
                "centroids": feed.delete_centroids(s, m.Centroid.speaker_id == speaker_id),
                "utterances": s.execute(delete(m.Utterance).where(m.Utterance.speaker_id == speaker_id)).rowcount,
            }
            s.execute(delete(m.Speaker).where(m.Speaker.id == speaker_id))
            # Read last: a refresh started up to now may have loaded the audio.
            running = sorted(s.scalars(select(m.Job.id).where(m.Job.kind == "refresh", m.Job.status == "running")))
            # The audit entry is written here, not through storage.keys: it must commit
            # or roll back with the erasure it records.
            s.add(m.AuditEntry(action=ERASURE, actor=actor, detail=counts, at=db.now()))
        return {**counts, "trained_into": trained_into, "running_refresh": running, **self._scrub.after_erasure()}


def _locked_speaker(s: Session, speaker: str, now: datetime) -> int:
    """The id of ``speaker``, created on first use, its row locked."""
    # Race-safe get-or-create: concurrent first enrollments of one speaker all succeed
    # instead of failing on the unique name.
    db.insert_ignoring_conflict(s, m.Speaker.__table__, {"name": speaker, "created_at": now})
    # The row lock serialises enrollments of one speaker across processes, so the
    # read-modify-write of its centroid cannot lose an update (SQLite: BEGIN IMMEDIATE
    # already serialises every writer).
    return s.execute(select(m.Speaker.id).where(m.Speaker.name == speaker).with_for_update()).scalar_one()


def _refuse_same_recording(s: Session, speaker_id: int, version: int, vector: np.ndarray, cut: float, doing: str) -> None:
    """:class:`DuplicateUtterance` when one of the speaker's utterances embeds within
    ``cut`` of ``vector`` at ``version``: the same recording, re-encoded or resampled
    (different bytes, so the content hash cannot tell)."""
    rows = s.execute(
        select(m.Utterance.id, m.Embedding.vector).select_from(m.Embedding).join(m.Utterance)
        .where(m.Utterance.speaker_id == speaker_id, m.Embedding.version == version)
    ).all()
    if not rows:
        return
    stored = np.stack([from_f32(v) for _, v in rows])
    cosines = stored @ vector / np.maximum(np.linalg.norm(stored, axis=1) * np.linalg.norm(vector), 1e-12)
    best = int(np.argmax(cosines))
    if cosines[best] >= cut:
        raise DuplicateUtterance(
            f"cannot {doing}: this recording is already enrolled for the speaker (utterance {rows[best][0]}, "
            f"cosine {cosines[best]:.4f}: the same audio in another encoding)"
        )


def _profile_centroid(s: Session, speaker_id: int, version: int, size: int) -> tuple[RunningCentroid, bool]:
    """The speaker's running centroid at ``version`` and whether its row exists; a
    ValueError when an embedding of ``size`` values does not fit the version."""
    row = s.execute(
        select(m.Centroid.dim, m.Centroid.count, m.Centroid.sum).where(
            m.Centroid.speaker_id == speaker_id, m.Centroid.version == version
        )
    ).first()
    if row is None:
        # A new profile: its dimension must agree with the version's other profiles.
        dim = s.scalar(select(m.Centroid.dim).where(m.Centroid.version == version).limit(1))
        running = RunningCentroid(dim=dim or size)
    else:
        dim, running = row.dim, running_centroid(row)
    if dim is not None and dim != size:
        raise ValueError(f"embedding has {size} values, version {version} stores {dim}")
    return running, row is not None


def _insert_utterance(
    s: Session,
    speaker_id: int,
    version: int,
    fields: dict[str, Any],
    status: str,
    vector: np.ndarray,
    kept: tuple[bytes, str, int],
    now: datetime,
) -> int:
    """Insert the utterance row, its kept audio and its embedding; returns its id."""
    # Core statements rather than ORM objects: enrollment is the hot path, and the unit
    # of work's bookkeeping cost more than the SQL itself.
    utterance_id = s.execute(
        insert(m.Utterance).returning(m.Utterance.id),
        {"speaker_id": speaker_id, **fields, "created_at": now, "status": status},
    ).scalar_one()
    data, codec, sample_rate = kept
    s.execute(
        insert(m.UtteranceAudio),
        {"utterance_id": utterance_id, "codec": codec, "sample_rate": sample_rate, "data": data},
    )
    s.execute(
        insert(m.Embedding),
        {"utterance_id": utterance_id, "version": version, "vector": f32(vector), "created_at": now},
    )
    return utterance_id


def _utterance_locked(s: Session, utterance_id: int) -> m.Utterance:
    """The utterance row, its speaker's row locked (centroid read-modify-write follows)."""
    query = select(m.Utterance.speaker_id).where(m.Utterance.id == utterance_id)
    speaker_id = s.scalar(query) if ids.fits(m.Utterance.id, utterance_id) else None
    if speaker_id is None:
        raise UnknownUtterance(f"no utterance {utterance_id}")
    s.execute(select(m.Speaker.id).where(m.Speaker.id == speaker_id).with_for_update())
    return s.get(m.Utterance, utterance_id)


def _trained_into(s: Session, speaker_id: int) -> list[int]:
    """Versions trained after the speaker's first utterance existed (refreshes only:
    a version without a parent was not trained here)."""
    first = s.scalar(select(func.min(m.Utterance.id)).where(m.Utterance.speaker_id == speaker_id))
    if first is None:
        return []
    return sorted(
        s.scalars(
            select(m.ModelVersion.number).where(
                m.ModelVersion.parent.is_not(None), m.ModelVersion.trained_through >= first
            )
        )
    )


def _speaker_id(s: Session, name: str) -> int:
    speaker_id = s.scalar(select(m.Speaker.id).where(m.Speaker.name == name))
    if speaker_id is None:
        raise UnknownSpeaker(f"no speaker named {name!r}")
    return speaker_id


def _profile_speech(s: Session, speaker_id: int) -> float:
    """Seconds of speech in a speaker's profile (its enrolled utterances)."""
    total = s.scalar(
        select(func.sum(m.Utterance.speech_s)).where(
            m.Utterance.speaker_id == speaker_id, m.Utterance.status == "enrolled"
        )
    )
    return float(total or 0.0)


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
