"""1:N search of one embedding against every enrolled speaker's centroid.

The whole search is one matrix-vector product and a partial sort, so its cost grows
linearly with the number of speakers with no Python loop over them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.scoring import normalise_rows


@dataclass(frozen=True)
class Hit:
    speaker: str
    score: float


class CentroidIndex:
    """Speaker names and their centroids under one model version.

    >>> index = CentroidIndex(["ann", "bob"], np.array([[1.0, 0.0], [0.6, 0.8]]))
    >>> [(h.speaker, round(h.score, 2)) for h in index.search(np.array([0.0, 1.0]), k=5)]
    [('bob', 0.8), ('ann', 0.0)]
    """

    def __init__(self, names: list[str], centroids: np.ndarray) -> None:
        if len(names) != len(centroids):
            raise ValueError(f"{len(names)} names but {len(centroids)} centroids")
        self.names = list(names)
        self._unit = normalise_rows(centroids) if len(names) else np.zeros((0, 0), dtype=np.float32)

    def __len__(self) -> int:
        return len(self.names)

    def search(self, embedding: np.ndarray, k: int = 5) -> list[Hit]:
        """The ``k`` best-scoring speakers, best first (fewer if fewer are enrolled)."""
        if not self.names or k <= 0:
            return []
        scores = self._unit @ normalise_rows(embedding)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [Hit(self.names[i], float(scores[i])) for i in top]
