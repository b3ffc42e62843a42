"""Utterances that arrived without a speaker: kept, embedded per version, erased.

They live apart from ``utterances`` (see :class:`voiceprint.storage.models.UnlabeledUtterance`),
so no centroid, training set, calibration or cohort can read one. Naming a cluster moves
them into a profile through :meth:`voiceprint.storage.profiles.Profiles.enroll` (its
``unlabeled_id``), which deletes the unlabeled row in the enrollment's own transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import delete, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from voiceprint.engine.errors import DuplicateUtterance, UnknownUtterance
from voiceprint.storage import db, ids
from voiceprint.storage import models as m
from voiceprint.storage.registry import require_active
from voiceprint.storage.records import UnlabeledRecord
from voiceprint.storage.scrub import UNLABELED_ERASURE, Scrub
from voiceprint.storage.vectors import f32, from_f32

U = m.UnlabeledUtterance


class Unlabeled:
    """The unlabeled utterances, their kept speech and their embeddings."""

    def __init__(self, database: db.Database, scrub: Scrub):
        self._db, self._scrub = database, scrub

    def add(
        self, *, version: int, source: str, content_sha256: str, duration_s: float, speech_s: float,
        quality: dict[str, Any], audio: bytes, codec: str, sample_rate: int, embedding: np.ndarray,
    ) -> UnlabeledRecord:
        """Store one unlabeled utterance with its embedding at ``version``, which must
        still be the active version (else :class:`VersionChanged`, nothing stored).

        Raises
        ------
        DuplicateUtterance
            The same input bytes are already stored unlabeled.
        """
        vector = np.asarray(embedding, dtype=np.float32)
        if vector.ndim != 1 or not np.all(np.isfinite(vector)):
            raise ValueError(f"embedding must be a finite 1-D vector, got shape {vector.shape}")
        fields = {"source": source, "content_sha256": content_sha256, "duration_s": duration_s,
                  "speech_s": speech_s, "quality": dict(quality)}
        doing = f"store unlabeled utterance {source!r}"
        try:
            with self._db.version_checked(version), self._db.session(doing, write=True) as s:
                require_active(s, version)
                same = s.scalar(select(U.id).where(U.content_sha256 == content_sha256))
                if same is not None:
                    raise DuplicateUtterance(f"cannot {doing}: the same audio is already stored unlabeled (utterance {same})")
                now = db.now()
                row_id = s.execute(
                    insert(U).returning(U.id),
                    {**fields, "created_at": now, "codec": codec, "sample_rate": sample_rate, "data": audio},
                ).scalar_one()
                s.execute(insert(m.UnlabeledEmbedding),
                          {"utterance_id": row_id, "version": version, "vector": f32(vector), "created_at": now})
                return UnlabeledRecord(id=row_id, **fields, created_at=now)
        except DuplicateUtterance:
            raise
        except IntegrityError:  # a concurrent writer stored the same bytes first
            raise DuplicateUtterance(f"cannot {doing}: the same audio is already stored unlabeled") from None

    def records(self, utterance_ids: Sequence[int] | None = None) -> list[UnlabeledRecord]:
        """Every unlabeled utterance (or those of ``utterance_ids`` still stored), by id; no audio."""
        with self._db.session("list unlabeled utterances") as s:
            query = select(U).order_by(U.id)
            if utterance_ids is not None:
                query = query.where(U.id.in_([i for i in utterance_ids if ids.fits(U.id, i)]))
            return [_record(row) for row in s.scalars(query)]

    def count(self) -> int:
        with self._db.session("count unlabeled utterances") as s:
            return s.scalar(select(func.count()).select_from(U))

    def embeddings(self, version: int) -> tuple[list[int], np.ndarray]:
        """Ids (ascending) and float32 ``[n, D]`` embeddings of the unlabeled utterances
        embedded at ``version``."""
        with self._db.session(f"read unlabeled embeddings of version {version}") as s:
            rows = s.execute(
                select(m.UnlabeledEmbedding.utterance_id, m.UnlabeledEmbedding.vector)
                .where(m.UnlabeledEmbedding.version == version)
                .order_by(m.UnlabeledEmbedding.utterance_id)
            ).all()
        if not rows:
            return [], np.zeros((0, 0), dtype=np.float32)
        return [uid for uid, _ in rows], np.stack([from_f32(v) for _, v in rows])

    def missing(self, version: int) -> list[int]:
        """Unlabeled utterances without an embedding at ``version`` (stored under an
        earlier active version), by id."""
        embedded = select(m.UnlabeledEmbedding.utterance_id).where(m.UnlabeledEmbedding.version == version)
        with self._db.session(f"find unlabeled utterances not embedded under version {version}") as s:
            return list(s.scalars(select(U.id).where(U.id.not_in(embedded)).order_by(U.id)))

    def kept(self, utterance_ids: Sequence[int]) -> dict[int, tuple[bytes, str, int]]:
        """What is kept of each (``(data, codec, sample_rate)``), for those still stored."""
        with self._db.session("read kept unlabeled speech") as s:
            rows = s.execute(select(U.id, U.data, U.codec, U.sample_rate).where(U.id.in_(list(utterance_ids))))
            return {uid: (data, codec, rate) for uid, data, codec, rate in rows}

    def add_embeddings(self, version: int, items: Sequence[tuple[int, np.ndarray]]) -> int:
        """Embeddings under ``version`` for stored unlabeled utterances; those deleted
        meanwhile or already embedded are skipped. Returns how many were added."""
        added = 0
        with self._db.version_checked(version), self._db.session(f"store unlabeled embeddings of version {version}", write=True) as s:
            present = set(s.scalars(select(U.id).where(U.id.in_([int(uid) for uid, _ in items]))))
            now = db.now()
            for uid, vector in items:
                if int(uid) in present:
                    added += db.insert_ignoring_conflict(
                        s, m.UnlabeledEmbedding.__table__,
                        {"utterance_id": int(uid), "version": version, "vector": f32(vector), "created_at": now},
                    )
        return added

    def erase(self, utterance_ids: Sequence[int], *, actor: str) -> dict[str, Any]:
        """Delete these unlabeled utterances with their kept speech and every embedding, in
        one transaction; the audit log records counts (no sources); the SQLite files are
        scrubbed as after a speaker's erasure. Ids no longer stored are ignored."""
        wanted = [int(i) for i in utterance_ids if ids.fits(U.id, int(i))]
        with self._db.session("erase unlabeled utterances", write=True) as s:
            embeddings = s.execute(
                delete(m.UnlabeledEmbedding).where(m.UnlabeledEmbedding.utterance_id.in_(wanted))
            ).rowcount
            utterances = s.execute(delete(U).where(U.id.in_(wanted))).rowcount
            counts = {"unlabeled_utterances": utterances, "embeddings": embeddings}
            if utterances:
                s.add(m.AuditEntry(action=UNLABELED_ERASURE, actor=actor, detail=counts, at=db.now()))
        return {**counts, **(self._scrub.after_erasure() if utterances else {"files_scrubbed": True, "scrub": "done"})}


def take_unlabeled(s: Session, utterance_id: int) -> None:
    """Delete an unlabeled utterance being enrolled under a name, inside the enrollment's
    transaction (its embeddings go by cascade); :class:`UnknownUtterance` if it is gone."""
    gone = not ids.fits(U.id, utterance_id) or not s.execute(delete(U).where(U.id == utterance_id)).rowcount
    if gone:
        raise UnknownUtterance(f"no unlabeled utterance {utterance_id} (named or deleted meanwhile)")


def _record(row: m.UnlabeledUtterance) -> UnlabeledRecord:
    return UnlabeledRecord(
        id=row.id, source=row.source, content_sha256=row.content_sha256, duration_s=row.duration_s,
        speech_s=row.speech_s, quality=row.quality, created_at=row.created_at,
    )
