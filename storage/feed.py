"""The centroid change feed: how a process learns which centroids changed since it last looked.

Every transaction that writes or deletes centroid rows notes them (:func:`touched`,
:func:`delete_centroids`); just before it commits, :func:`stamp` takes the next revision
from the one-row ``centroid_feed`` table and writes it on those rows (a deleted row
leaves a tombstone). The counter row stays locked until the commit, so transactions
commit in the order of their revisions: a reader that first takes the counter's value
``now`` sees every change up to ``now`` already committed, and reading the rows with
``since < revision <= now`` misses nothing (:func:`changes`). SQLite serialises writers
anyway; on PostgreSQL the lock is held for the few statements after the work is done.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from sqlalchemy import delete, insert, select, update
from sqlalchemy.orm import Session

from voiceprint.storage import models as m

_TOUCHED, _GONE = "voiceprint.centroids_touched", "voiceprint.centroids_gone"
_CHUNK = 500  # ids per IN list (SQLite's limit on bound variables is far above)


def touched(session: Session, version: int, speaker_id: int) -> None:
    """Note a centroid row written in this transaction."""
    session.info.setdefault(_TOUCHED, set()).add((version, speaker_id))


def delete_centroids(session: Session, *where) -> int:
    """Delete the centroid rows matching ``where``, noting each for a tombstone; how many."""
    gone = session.execute(delete(m.Centroid).where(*where).returning(m.Centroid.version, m.Centroid.speaker_id)).all()
    session.info.setdefault(_GONE, set()).update((v, s) for v, s in gone)
    return len(gone)


def stamp(session: Session) -> None:
    """Give this transaction's centroid changes the next revision (a ``before_commit`` hook)."""
    written, gone = session.info.pop(_TOUCHED, set()), session.info.pop(_GONE, set())
    if not written and not gone:
        return
    revision = session.execute(
        update(m.CentroidFeed).where(m.CentroidFeed.id == 1)
        .values(revision=m.CentroidFeed.revision + 1).returning(m.CentroidFeed.revision)
    ).scalar_one_or_none()
    if revision is None:  # a database made without the migrations' row
        session.execute(insert(m.CentroidFeed).values(id=1, revision=1))
        revision = 1
    for version, ids in _by_version(written):
        session.execute(update(m.Centroid).where(m.Centroid.version == version, m.Centroid.speaker_id.in_(ids))
                        .values(revision=revision))
    for version, ids in _by_version(gone):
        session.execute(delete(m.CentroidTombstone).where(m.CentroidTombstone.version == version,
                                                          m.CentroidTombstone.speaker_id.in_(ids)))
        session.execute(insert(m.CentroidTombstone), [{"version": version, "speaker_id": i, "revision": revision} for i in ids])


def current(session: Session) -> int:
    """The revision of the newest committed change (0 before any)."""
    return session.scalar(select(m.CentroidFeed.revision).where(m.CentroidFeed.id == 1)) or 0


def changes(session: Session, version: int, since: int) -> tuple[int, list, list[int]]:
    """``(now, rows, removed)``: the feed's revision, the ``(speaker id, name, mean bytes)``
    of ``version``'s centroids written after ``since`` up to ``now``, and the speaker ids
    whose centroid was deleted in that span and not written again."""
    now = current(session)  # first: everything up to it has committed (see the module's notes)
    rows = session.execute(
        select(m.Centroid.speaker_id, m.Speaker.name, m.Centroid.mean)
        .join(m.Speaker, m.Speaker.id == m.Centroid.speaker_id)
        .where(m.Centroid.version == version, m.Centroid.revision > since, m.Centroid.revision <= now)
    ).all()
    written = {r[0] for r in rows}
    removed = session.scalars(
        select(m.CentroidTombstone.speaker_id)
        .where(m.CentroidTombstone.version == version, m.CentroidTombstone.revision > since,
               m.CentroidTombstone.revision <= now)
    ).all()
    return now, rows, [i for i in removed if i not in written]


def _by_version(pairs: Iterable[tuple[int, int]]) -> Iterable[tuple[int, list[int]]]:
    grouped: dict[int, list[int]] = defaultdict(list)
    for version, speaker_id in pairs:
        grouped[version].append(speaker_id)
    for version, ids in grouped.items():
        ids.sort()
        for start in range(0, len(ids), _CHUNK):
            yield version, ids[start : start + _CHUNK]
