"""A version's centroids held in memory, kept current from the store's change feed.

Built once per process from every centroid of the version, then brought up to date by
applying only what changed since the revision it holds (:meth:`Gallery.apply` with a
:class:`voiceprint.storage.CentroidChanges`): new and moved profiles are written in place,
removed ones swapped out (:class:`~voiceprint.engine.rows.Rows`). Memory: one float32
row of the embedding's dimension per speaker (1 KiB at 256 dimensions, so about 1 GiB
for a million speakers).

>>> import numpy as np
>>> from types import SimpleNamespace as Changes
>>> g = Gallery(dim=2)
>>> g.apply(Changes(revision=3, speaker_ids=np.array([7, 9]), names=["bo", "al"],
...                 means=np.eye(2, dtype=np.float32), removed=[]))
2
>>> g.apply(Changes(revision=5, speaker_ids=np.array([], dtype=np.int64), names=[],
...                 means=np.zeros((0, 2), dtype=np.float32), removed=[7]))
1
>>> g.snapshot()[1:2], g.revision, len(g)
((['al'],), 5, 1)
"""

from __future__ import annotations

import threading

import numpy as np

from voiceprint.engine.rows import Rows


class Gallery:
    """Speaker ids, names and centroid means of one version, current to ``revision``."""

    def __init__(self, dim: int | None = None) -> None:
        self.revision = -1  # the change-feed revision applied last (-1: nothing yet)
        self._rows = Rows(mean=(dim or 0,))
        self._lock = threading.Lock()  # the service applies and snapshots from several threads

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def nbytes(self) -> int:
        """Memory held by the means (allocated rows, not only the used ones)."""
        return self._rows.nbytes

    def apply(self, changes) -> int:
        """Apply written rows and removals (a ``CentroidChanges``); how many rows changed."""
        with self._lock:
            self._rows.remove(changes.removed)
            if len(changes.names) and not len(self._rows) and self._rows.shape("mean") != changes.means.shape[1:]:
                self._rows.reshape("mean", changes.means.shape[1:])  # the dimension, learnt
            self._rows.put(changes.speaker_ids.tolist(), changes.names, mean=changes.means)
            self.revision = changes.revision
            return len(changes.removed) + len(changes.names)

    def snapshot(self) -> tuple[list[int], list[str], np.ndarray, int]:
        """Speaker ids, names, a copy of their means ``[n, D]`` (safe from later changes)
        and the revision they are current to."""
        with self._lock:
            return list(self._rows.ids), list(self._rows.names), self._rows.array("mean"), self.revision
