"""1:N search of one embedding against every enrolled speaker's profile.

The whole search is a few matrix-vector products and a partial sort, so its cost grows
linearly with the number of speakers with no Python loop over them. With a cohort the
scores are AS-normalised (the enrollment-side statistics of every profile are computed
once and handed in), and with a calibration they are turned into LLRs as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from voiceprint.engine.calibration import Calibration
from voiceprint.engine.scoring import Cohort, asnorm, normalise_rows


@dataclass(frozen=True)
class Hit:
    speaker: str
    score: float  # cosine with the speaker's profile (centred when the calibration centres)
    normalised: float | None = None  # AS-norm score, when there is a cohort
    llr: float | None = None  # log-likelihood ratio, when the version is calibrated

    def on(self, backend: str) -> float | None:
        """The score on one back-end's scale."""
        return {"cosine": self.score, "asnorm": self.normalised, "asnorm+calibrated": self.llr}[backend]


class CentroidIndex:
    """Speaker names and their profiles under one model version.

    ``prototypes``: extra rows ``(owner index [Q], vectors [Q, D])``; a speaker's raw
    score is then its best row (mean or prototype).

    >>> index = CentroidIndex(["ann", "bob"], np.array([[1.0, 0.0], [0.6, 0.8]]))
    >>> [(h.speaker, round(h.score, 2)) for h in index.search(np.array([0.0, 1.0]), k=5)]
    [('bob', 0.8), ('ann', 0.0)]
    """

    def __init__(
        self,
        names: list[str],
        centroids: np.ndarray,
        *,
        cohort: Cohort | None = None,
        enroll_stats: tuple[np.ndarray, np.ndarray] | None = None,
        calibration: Calibration | None = None,
        prototypes: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        if len(names) != len(centroids):
            raise ValueError(f"{len(names)} names but {len(centroids)} centroids")
        self.names = list(names)
        self._positions = {name: i for i, name in enumerate(self.names)}
        self._unit = normalise_rows(centroids) if len(names) else np.zeros((0, 0), dtype=np.float32)
        self._cohort = cohort
        if cohort is not None and enroll_stats is None and len(names):
            enroll_stats = cohort.enrollment_stats(self.names, centroids)
        self._enroll_stats = enroll_stats
        self._calibration = calibration if cohort is not None and calibration is not None and calibration.slope is not None else None
        self._prototypes = prototypes

    def __len__(self) -> int:
        return len(self.names)

    def scores(self, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Raw cosine, AS-norm score and LLR of ``embedding`` against every speaker ``[N]``
        (None where there is no cohort or no calibration)."""
        probe = normalise_rows(embedding)
        raw = (self._unit @ probe).astype(np.float64)
        if self._prototypes is not None and len(self._prototypes[0]):
            owner, vectors = self._prototypes
            np.maximum.at(raw, owner, normalise_rows(vectors) @ probe)
        normalised = llr = None
        if self._cohort is not None and self._enroll_stats is not None:
            t_mean, t_std = self._cohort.test_stats(probe, self.names, positions=self._positions)
            normalised = asnorm(raw, self._enroll_stats[0], self._enroll_stats[1], t_mean, t_std)
            if self._calibration is not None:
                llr = self._calibration.llr(normalised)
        return raw, normalised, llr

    def search(self, embedding: np.ndarray, k: int = 5) -> list[Hit]:
        """The ``k`` best speakers by raw cosine, best first (fewer if fewer are enrolled),
        each with its score on every scale this index can compute.

        Ranked by cosine, not by the normalised score: AS-norm's per-speaker statistics
        reorder speakers and cost 2.4 points of top-1 accuracy on speechocean762, while
        deciding on the normalised score of the cosine winner keeps all of its gain
        (bench/decisions.py).
        """
        if not self.names or k <= 0:
            return []
        raw, normalised, llr = self.scores(embedding)
        k = min(k, len(raw))
        top = np.argpartition(-raw, k - 1)[:k]
        top = top[np.argsort(-raw[top], kind="stable")]
        return [
            Hit(
                self.names[i],
                float(raw[i]),
                None if normalised is None else float(normalised[i]),
                None if llr is None else float(llr[i]),
            )
            for i in top
        ]
