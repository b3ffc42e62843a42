"""Embeddings of a whole version: re-embedding, catching up, the score cohort and the
kept audio they are computed from."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import numpy as np
from sqlalchemy import Select, func, insert, select
from sqlalchemy.orm import Session

from voiceprint.engine.centroids import RunningCentroid
from voiceprint.storage import db
from voiceprint.storage import models as m
from voiceprint.storage.vectors import f32, from_f32, running_centroid, save_centroid


class Embeddings:
    """Version-wide reads and writes of embeddings and the audio kept to recompute them."""

    def __init__(self, database: db.Database):
        self._db = database

    def missing_embeddings(self, version: int) -> list[tuple[int, str]]:
        """``(utterance id, speaker)`` of every enrolled (not pending) utterance without an
        embedding at ``version``, by id."""
        with self._db.session(f"find utterances not embedded under version {version}") as s:
            return [(uid, name) for uid, name in s.execute(missing_embeddings_query(version))]

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
        doing = f"store embeddings under version {version}"
        with self._db.version_checked(version), self._db.session(doing, write=True) as s:
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
            now = db.now()
            s.execute(
                insert(m.Embedding),
                [{"utterance_id": uid, "version": version, "vector": f32(vectors[uid]), "created_at": now} for uid in todo],
            )
            by_speaker: dict[int, list[np.ndarray]] = {}
            for uid in todo:
                by_speaker.setdefault(owners[uid], []).append(vectors[uid])
            _learn_centroids(s, version, by_speaker, now)
            return len(todo)

    def version_embeddings(self, version: int) -> tuple[np.ndarray, list[str], np.ndarray]:
        """The embedding at ``version`` of every enrolled (not pending) utterance: utterance
        ids (ascending), their speakers, and the float32 matrix [n, D]."""
        with self._db.session(f"read the embeddings of version {version}") as s:
            rows = s.execute(_enrolled(version).order_by(m.Embedding.utterance_id)).all()
        return _matrix(rows)

    def sampled_embeddings(self, version: int, speakers: int, *, seed: int) -> tuple[tuple[np.ndarray, list[str], np.ndarray], int]:
        """:meth:`version_embeddings` of at most ``speakers`` speakers of ``version``, drawn
        at random (``seed``) when more have embeddings there, and how many speakers the
        version has (centroids): a calibration at a million speakers reads what it fits
        on, not every stored embedding."""
        with self._db.session(f"read a sample of the embeddings of version {version}") as s:
            enrolled = s.scalar(select(func.count()).select_from(m.Centroid).where(m.Centroid.version == version))
            # Drawn among the speakers with embeddings stored at the version: those are the
            # ones a trial can be made of.
            held = s.scalars(
                select(m.Utterance.speaker_id)
                .join(m.Embedding, m.Embedding.utterance_id == m.Utterance.id)
                .where(m.Embedding.version == version, m.Utterance.status == "enrolled")
                .distinct()
                .order_by(m.Utterance.speaker_id)
            ).all()
            if len(held) <= speakers:
                rows = s.execute(_enrolled(version).order_by(m.Embedding.utterance_id)).all()
            else:
                chosen = np.sort(np.random.default_rng(seed).choice(np.array(held), speakers, replace=False)).tolist()
                rows = []
                for start in range(0, len(chosen), 900):  # SQLite binds at most 999 parameters
                    rows += s.execute(_enrolled(version).where(m.Utterance.speaker_id.in_(chosen[start : start + 900]))).all()
                rows.sort(key=lambda r: r[0])
        return _matrix(rows), enrolled

    def audio_many(self, utterance_ids: Sequence[int]) -> dict[int, tuple[bytes, str, int]]:
        """The kept audio of several utterances: ``{id: (data, codec, sample_rate)}``;
        ids without audio (deleted meanwhile) are absent."""
        with self._db.session(f"read the audio of {len(utterance_ids)} utterances") as s:
            rows = s.execute(
                select(m.UtteranceAudio).where(m.UtteranceAudio.utterance_id.in_([int(i) for i in utterance_ids]))
            ).scalars()
            return {row.utterance_id: (row.data, row.codec, row.sample_rate) for row in rows}

    def embedding_sum(self, version: int, *, through: int | None = None) -> RunningCentroid:
        """Running sum and count of the enrolled embeddings at ``version`` (utterance ids up
        to ``through`` when given): the domain centre of the score back-end. Streamed, so
        a large version is never held in memory at once."""
        total = None
        query = (
            select(m.Embedding.vector)
            .join(m.Utterance, m.Utterance.id == m.Embedding.utterance_id)
            .where(m.Embedding.version == version, m.Utterance.status == "enrolled")
            .where(m.Utterance.id <= through if through is not None else True)
        )
        with self._db.session(f"sum the embeddings of version {version}") as s:
            for vector in s.scalars(query.execution_options(yield_per=4096)):
                vector = from_f32(vector)
                total = (total or RunningCentroid(dim=len(vector))).learn_one(vector)
        return total if total is not None else RunningCentroid(dim=0)

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
        with self._db.session(f"read the score cohort of version {version}") as s:
            rows = s.execute(
                select(ranked.c.utterance_id, ranked.c.name, ranked.c.vector)
                .where(ranked.c.rank <= per_speaker)
                .order_by(ranked.c.utterance_id)
            ).all()
        return _matrix(rows)


def missing_embeddings_query(version: int) -> Select:
    """``(utterance id, speaker)`` of enrolled utterances with no embedding at ``version``."""
    embedded = select(m.Embedding.utterance_id).where(m.Embedding.version == version)
    return (
        select(m.Utterance.id, m.Speaker.name)
        .join(m.Speaker)
        .where(m.Utterance.id.not_in(embedded), m.Utterance.status == "enrolled")
        .order_by(m.Utterance.id)
    )


def _learn_centroids(s: Session, version: int, by_speaker: dict[int, list[np.ndarray]], now: datetime) -> None:
    """Fold each speaker's new embeddings into its centroid at ``version``, rows locked."""
    rows = {
        row.speaker_id: row
        for row in s.execute(
            select(m.Centroid.speaker_id, m.Centroid.dim, m.Centroid.count, m.Centroid.sum)
            .where(m.Centroid.version == version, m.Centroid.speaker_id.in_(by_speaker))
            .with_for_update()
        )
    }
    for speaker_id, vectors in by_speaker.items():
        row = rows.get(speaker_id)
        running = running_centroid(row) if row is not None else RunningCentroid(dim=vectors[0].size)
        for vector in vectors:
            running.learn_one(vector)
        save_centroid(s, speaker_id, version, running, now, exists=row is not None)


def _enrolled(version: int) -> Select:
    """``(utterance id, speaker, vector)`` of the enrolled utterances embedded at ``version``."""
    return (
        select(m.Embedding.utterance_id, m.Speaker.name, m.Embedding.vector)
        .join(m.Utterance, m.Utterance.id == m.Embedding.utterance_id)
        .join(m.Speaker, m.Speaker.id == m.Utterance.speaker_id)
        .where(m.Embedding.version == version, m.Utterance.status == "enrolled")
    )


def _matrix(rows: Sequence) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``(utterance id, speaker, vector bytes)`` rows as ids, speakers and a float32 matrix."""
    if not rows:
        return np.zeros(0, dtype=np.int64), [], np.zeros((0, 0), dtype=np.float32)
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    return ids, [r[1] for r in rows], np.stack([from_f32(r[2]) for r in rows])
