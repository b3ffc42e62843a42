"""Vectors as stored: byte codecs, and centroid rows as running statistics.

This is the one place where a centroid row becomes a :class:`RunningCentroid` and back,
so the float64 sum (what makes removal exact) is encoded the same way everywhere.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from voiceprint.engine.centroids import RunningCentroid
from voiceprint.storage import feed
from voiceprint.storage import models as m


def f32(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def f64(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f8").tobytes()


def from_f32(data: bytes) -> np.ndarray:
    # astype copies: frombuffer views are read-only and may be non-native byte order.
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def from_f64(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f8").astype(np.float64)


def running_centroid(row: Any) -> RunningCentroid:
    """The running statistics of a centroid row (an ORM row or a selected ``dim, count, sum``)."""
    return RunningCentroid(dim=row.dim, sum=from_f64(row.sum), count=row.count)


def save_centroid(
    session: Session, speaker_id: int, version: int, running: RunningCentroid, now: datetime, *, exists: bool
) -> None:
    """Insert or update one centroid row from its running statistics; an emptied one is deleted."""
    where = (m.Centroid.speaker_id == speaker_id, m.Centroid.version == version)
    if running.count == 0:
        feed.delete_centroids(session, *where)
        return
    feed.touched(session, version, speaker_id)
    values = {"count": running.count, "sum": f64(running.sum), "mean": f32(running.mean), "updated_at": now}
    if exists:
        session.execute(update(m.Centroid).where(*where).values(**values))
    else:
        session.execute(insert(m.Centroid), {"speaker_id": speaker_id, "version": version, "dim": running.dim, **values})


def fold(session: Session, utterance: m.Utterance, sign: int, now: datetime) -> None:
    """Add (+1) or remove (-1) each stored embedding of ``utterance`` to or from its
    version's centroid; the caller holds the speaker's row lock."""
    for version, vector in session.execute(
        select(m.Embedding.version, m.Embedding.vector).where(m.Embedding.utterance_id == utterance.id)
    ):
        row = session.get(m.Centroid, (utterance.speaker_id, version))
        vec = from_f32(vector)
        running = RunningCentroid(dim=vec.size) if row is None else running_centroid(row)
        if sign > 0:
            running.learn_one(vec)
        else:
            running.remove_one(vec)
        save_centroid(session, utterance.speaker_id, version, running, now, exists=row is not None)
