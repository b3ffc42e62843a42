"""A version's centroids held in memory, kept current from the store's change feed.

Built once per process from every centroid of the version, then brought up to date by
applying only what changed since the revision it holds (:meth:`Gallery.apply` with a
:class:`voiceprint.storage.CentroidChanges`): new and moved profiles are written in place,
removed ones swapped out. Memory: one float32 row of the embedding's dimension per
speaker (1 KiB at 256 dimensions, so about 1 GiB for a million speakers), kept in an
array allocated once for the first build and grown by a quarter after that.

>>> import numpy as np
>>> from types import SimpleNamespace as Changes
>>> g = Gallery(dim=2)
>>> g.apply(Changes(revision=3, speaker_ids=np.array([7, 9]), names=["bo", "al"],
...                 means=np.eye(2, dtype=np.float32), removed=[]))
2
>>> g.apply(Changes(revision=5, speaker_ids=np.array([], dtype=np.int64), names=[],
...                 means=np.zeros((0, 2), dtype=np.float32), removed=[7]))
1
>>> g.snapshot()[0], g.revision, len(g)
(['al'], 5, 1)
"""

from __future__ import annotations

import threading

import numpy as np


class Gallery:
    """Speaker ids, names and centroid means of one version, current to ``revision``."""

    def __init__(self, dim: int | None = None) -> None:
        self.revision = -1  # the change-feed revision applied last (-1: nothing yet)
        self._row: dict[int, int] = {}  # speaker id -> row
        self._ids: list[int] = []
        self._names: list[str] = []
        self._means = np.zeros((0, dim or 0), dtype=np.float32)
        self._lock = threading.Lock()  # the service applies and snapshots from several threads

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def nbytes(self) -> int:
        """Memory held by the means (allocated rows, not only the used ones)."""
        return self._means.nbytes

    def apply(self, changes) -> int:
        """Apply written rows and removals (a ``CentroidChanges``); how many rows changed."""
        with self._lock:
            for speaker_id in changes.removed:
                self._remove(int(speaker_id))
            if len(changes.names) and not self._ids and self._means.shape[1] != changes.means.shape[1]:
                self._means = np.zeros((0, changes.means.shape[1]), dtype=np.float32)  # the dimension, learnt
            self._reserve(len(self._ids) + len(changes.names))  # a first build allocates once, not by doubling
            for speaker_id, name, mean in zip(changes.speaker_ids.tolist(), changes.names, changes.means):
                row = self._row.get(speaker_id)
                if row is None:
                    row = self._append(speaker_id)
                self._names[row] = name  # an id can come back under another name (a reused id)
                self._means[row] = mean
            self.revision = changes.revision
            return len(changes.removed) + len(changes.names)

    def snapshot(self) -> tuple[list[str], np.ndarray]:
        """Names and a copy of their means ``[n, D]``, safe from later changes."""
        with self._lock:
            return list(self._names), self._means[: len(self._ids)].copy()

    def _reserve(self, rows: int) -> None:
        if rows > len(self._means):
            grown = np.zeros((rows, self._means.shape[1]), dtype=np.float32)
            grown[: len(self._ids)] = self._means[: len(self._ids)]
            self._means = grown

    def _append(self, speaker_id: int) -> int:
        row = len(self._ids)
        if row == len(self._means):
            self._reserve(max(16, row + row // 4))  # by a quarter: at a million rows, doubling would take another GiB
        self._row[speaker_id] = row
        self._ids.append(speaker_id)
        self._names.append("")
        return row

    def _remove(self, speaker_id: int) -> None:
        row = self._row.pop(speaker_id, None)
        if row is None:
            return
        last = len(self._ids) - 1
        if row != last:  # the last row takes the removed one's place
            moved = self._ids[last]
            self._ids[row], self._names[row], self._means[row] = moved, self._names[last], self._means[last]
            self._row[moved] = row
        self._ids.pop()
        self._names.pop()
