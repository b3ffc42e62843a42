"""Running per-speaker statistics.

A centroid is kept as a float64 running sum and a count, so that the mean is exact
(to float precision) however many utterances were added, and so that removing an
utterance or merging two profiles is exact as well. Scoring uses the mean; cosine
scoring makes its length irrelevant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RunningCentroid:
    """Sum and count of the embeddings of one speaker under one model version.

    >>> c = RunningCentroid(dim=2).learn_one(np.array([1.0, 0.0])).learn_one(np.array([0.0, 1.0]))
    >>> c.count, c.mean.tolist()
    (2, [0.5, 0.5])
    >>> c.remove_one(np.array([0.0, 1.0])).mean.tolist()
    [1.0, 0.0]
    """

    dim: int
    sum: np.ndarray = field(default=None)  # type: ignore[assignment]
    count: int = 0

    def __post_init__(self) -> None:
        if self.sum is None:
            self.sum = np.zeros(self.dim, dtype=np.float64)
        else:
            self.sum = np.asarray(self.sum, dtype=np.float64).copy()
            if self.sum.shape != (self.dim,):
                raise ValueError(f"centroid sum has shape {self.sum.shape}, expected ({self.dim},)")

    @property
    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("an empty centroid has no mean")
        return self.sum / self.count

    def learn_one(self, embedding: np.ndarray) -> RunningCentroid:
        self.sum += self._check(embedding)
        self.count += 1
        return self

    def remove_one(self, embedding: np.ndarray) -> RunningCentroid:
        if self.count == 0:
            raise ValueError("cannot remove from an empty centroid")
        self.sum -= self._check(embedding)
        self.count -= 1
        if self.count == 0:
            # Forget accumulated rounding error: an empty profile is exactly zero.
            self.sum[:] = 0.0
        return self

    def merge(self, other: RunningCentroid) -> RunningCentroid:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge centroids of dimension {self.dim} and {other.dim}")
        self.sum += other.sum
        self.count += other.count
        return self

    def admits(self, vector: np.ndarray, cut: float | None, min_count: int) -> tuple[bool, float | None]:
        """Whether ``vector`` sounds enough like this profile to join it, and the cosine.

        Returns ``(ok, similarity)``: ``similarity`` is the cosine between ``vector`` and
        the mean, None for an empty profile. ``ok`` is False only when ``similarity`` is
        below ``cut``: a profile of fewer than ``min_count`` utterances admits anything
        (its mean is too noisy to judge by), and so does every profile when ``cut`` is
        None.

        >>> c = RunningCentroid(dim=2)
        >>> c.admits(np.array([1.0, 0.0]), cut=0.5, min_count=1)
        (True, None)
        >>> ok, similarity = c.learn_one(np.array([1.0, 0.0])).admits(np.array([0.0, 2.0]), cut=0.5, min_count=1)
        >>> ok, round(similarity, 3)
        (False, 0.0)
        >>> c.admits(np.array([0.0, 2.0]), cut=0.5, min_count=2)[0]
        True
        """
        x = self._check(vector)
        if self.count == 0:
            return True, None
        # Floored norms: a zero vector scores 0 rather than NaN.
        mean = self.mean / max(float(np.linalg.norm(self.mean)), 1e-12)
        similarity = float(mean @ (x / max(float(np.linalg.norm(x)), 1e-12)))
        held = cut is not None and self.count >= min_count and similarity < cut
        return not held, similarity

    def _check(self, embedding: np.ndarray) -> np.ndarray:
        x = np.asarray(embedding, dtype=np.float64).reshape(-1)
        if x.shape != (self.dim,):
            raise ValueError(f"embedding has {x.shape[0]} values, expected {self.dim}")
        if not np.all(np.isfinite(x)):
            raise ValueError("embedding has non-finite values")
        return x


def prototypes(embeddings: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    """``k`` k-means centres of one speaker's (unit) embeddings, for a multi-modal profile
    (e.g. a phone and a laptop microphone). Fewer than ``2 k`` embeddings give none:
    clusters of one utterance would only memorise it.

    >>> pts = np.array([[1, 0.1], [1, -0.1], [-0.1, 1], [0.1, 1]], dtype=float)
    >>> sorted(np.round(prototypes(pts, 2), 2).tolist())
    [[0.0, 1.0], [1.0, 0.0]]
    """
    from scipy.cluster.vq import kmeans2

    x = np.asarray(embeddings, dtype=np.float64)
    if k < 1 or len(x) < 2 * k:
        return np.zeros((0, x.shape[1] if x.ndim == 2 else 0))
    centres, _ = kmeans2(x, k, minit="++", seed=seed)
    return centres
