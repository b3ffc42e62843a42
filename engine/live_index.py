"""The 1:N index each process holds per model version, kept current from the database's
centroid change feed (:mod:`voiceprint.storage.feed`) instead of read again per query.

A version's :class:`~voiceprint.engine.gallery.Gallery` is built from every centroid on
first use, then brought up to date with only what changed, at most every ``[index]
refresh_s`` and at once after this process's own writes; the search index made from it
(with the version's scoring state) is kept until the gallery's revision or that state moves.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from voiceprint.engine.config import Config
from voiceprint.engine.gallery import Gallery
from voiceprint.engine.index import CentroidIndex
from voiceprint.storage import Store


class LiveIndexes:
    """Galleries and search indexes of the versions this process answers for."""

    def __init__(self, store: Store, config: Config) -> None:
        self.store, self.config = store, config
        self._galleries: dict[int, tuple[Gallery, float, int]] = {}  # version -> (gallery, synced at, writes seen)
        self._indexes: dict[int, tuple[tuple, CentroidIndex]] = {}
        self._lock = threading.Lock()  # the service answers from several threads

    def gallery(self, version: int) -> Gallery:
        """``version``'s centroids in this process, current to the database's change feed:
        built once, then read again at most every ``[index] refresh_s`` (at once after
        this process's own writes), and only what changed."""
        with self._lock:
            gallery, synced, seen = self._galleries.get(version) or (Gallery(), 0.0, -1)
            writes, now = self.store.writes, time.monotonic()
            if gallery.revision < 0 or writes != seen or now - synced >= self.config.index.refresh_s:
                gallery.apply(self.store.profiles.centroid_changes(version, gallery.revision))
                synced, seen = now, writes
            self._galleries[version] = (gallery, synced, seen)
            return gallery

    def status(self) -> list[dict]:
        """Each version this process holds an index of: its size, memory, the revision it
        is current to, and how far the database's feed has moved past it."""
        feed = self.store.profiles.centroid_revision()
        with self._lock:
            held = sorted(self._galleries.items())
        return [
            {"version": version, "kind": "exact", "speakers": len(g), "memory_bytes": g.nbytes,
             "revision": g.revision, "feed_revision": feed, "behind": max(0, feed - g.revision),
             "synced_s_ago": round(time.monotonic() - synced, 3)}
            for version, (g, synced, _) in held
        ]

    def index(self, version: int, scoring) -> CentroidIndex:
        """The 1:N index of ``version``: its gallery with ``scoring``'s centre, cohort
        statistics and calibration (a ``VersionScoring``), rebuilt only when either changed."""
        gallery = self.gallery(version)
        key = (gallery.revision, scoring.serial)
        with self._lock:
            cached = self._indexes.get(version)
            if cached is not None and cached[0] == key:
                return cached[1]
        names, centroids = gallery.snapshot()
        centroids = scoring.centred(centroids)
        stats = scoring.enrollment_stats(names, centroids) if scoring.cohort is not None and names else None
        protos = None
        if scoring.prototypes:
            rows = [(i, p) for i, n in enumerate(names) for p in scoring.prototypes.get(n, [])]
            if rows:
                protos = (np.array([i for i, _ in rows]), np.stack([p for _, p in rows]))
        index = CentroidIndex(
            names, centroids, cohort=scoring.cohort, enroll_stats=stats, calibration=scoring.calibration, prototypes=protos
        )
        with self._lock:
            self._indexes[version] = (key, index)
        return index
