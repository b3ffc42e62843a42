"""1:N search of one embedding against every enrolled speaker's profile.

Exact search is a matrix-vector product over every profile and a partial sort: its cost
grows linearly with the number of speakers, with no Python loop over them. Above
``[index] approximate_from`` speakers an approximate index (:mod:`voiceprint.engine.ann`)
proposes candidates instead, rescored exactly. With a cohort the best ``k`` are
AS-normalised (each profile's enrollment-side statistics are computed when the profile is
written, and kept), and with a calibration turned into LLRs as well. Profiles are
written and removed in place, so a live gallery is never rebuilt for one change.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from voiceprint.engine.ann import ApproximateSearch
from voiceprint.engine.calibration import Calibration
from voiceprint.engine.rows import Rows
from voiceprint.engine.scoring import Cohort, asnorm, normalise_rows

CANDIDATES = 32  # rows an approximate search returns to be rescored exactly


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
    """Speaker names and their profiles under one model version, changed in place.

    ``ids``: a key per speaker (the store's speaker id; default: its position), by which
    :meth:`put` and :meth:`remove` change rows later. ``prototypes``: extra rows
    ``(owner index [Q], vectors [Q, D])``; a speaker's raw score is then its best row
    (mean or prototype), and the index cannot change in place. ``approximate``: search an
    approximate index (:mod:`voiceprint.engine.ann`) and rescore its candidates exactly,
    instead of scoring every row.

    >>> index = CentroidIndex(["ann", "bob"], np.array([[1.0, 0.0], [0.6, 0.8]]))
    >>> [(h.speaker, round(h.score, 2)) for h in index.search(np.array([0.0, 1.0]), k=5)]
    [('bob', 0.8), ('ann', 0.0)]
    >>> index.put([2], ["cy"], np.array([[0.0, 1.0]])); index.remove([1])
    >>> [h.speaker for h in index.search(np.array([0.0, 1.0]), k=5)]
    ['cy', 'ann']
    """

    def __init__(
        self,
        names: list[str],
        centroids: np.ndarray,
        *,
        ids=None,
        cohort: Cohort | None = None,
        enroll_stats: tuple[np.ndarray, np.ndarray] | None = None,
        calibration: Calibration | None = None,
        prototypes: tuple[np.ndarray, np.ndarray] | None = None,
        approximate: bool = False,
    ) -> None:
        if len(names) != len(centroids):
            raise ValueError(f"{len(names)} names but {len(centroids)} centroids")
        centroids = np.asarray(centroids)
        dim = centroids.shape[1] if centroids.ndim == 2 else 0
        self._rows = Rows(unit=(dim,), enroll_mean=(), enroll_std=())
        self._cohort = cohort
        self._calibration = calibration if cohort is not None and calibration is not None and calibration.slope is not None else None
        self._prototypes = prototypes
        self._lock = threading.Lock()  # the live index changes rows while the service searches
        ids = range(len(names)) if ids is None else ids
        self._put(list(ids), list(names), centroids, enroll_stats)
        self._ann = None
        if approximate and prototypes is None and len(self._rows):
            self._ann = ApproximateSearch(self._rows.ids, self._rows.blocks("unit"))

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def names(self) -> list[str]:
        return self._rows.names

    @property
    def kind(self) -> str:
        return "exact" if self._ann is None else "approximate"

    @property
    def nbytes(self) -> int:
        """Memory of the search rows and, when there is one, the approximate index."""
        return self._rows.nbytes + (self._ann.nbytes if self._ann is not None else 0)

    def put(self, ids, names: list[str], centroids: np.ndarray) -> None:
        """Add or move the profiles of ``ids``; their cohort statistics are computed here,
        for these rows only."""
        if self._prototypes is not None:
            raise ValueError("an index with prototypes is rebuilt, not changed in place")
        with self._lock:
            rows = self._put(list(ids), list(names), np.asarray(centroids), None)
            if self._ann is not None:
                self._ann.put([self._rows.ids[r] for r in rows], self._rows.take("unit", rows))

    def remove(self, ids) -> None:
        """Drop the profiles of ``ids`` (unknown ids are ignored)."""
        with self._lock:
            self._rows.remove(ids)
            if self._ann is not None:
                self._ann.remove(ids)

    def _put(self, ids: list, names: list[str], centroids: np.ndarray, stats) -> list[int]:
        if not names:
            return []
        if stats is None and self._cohort is not None:
            stats = self._cohort.enrollment_stats(names, centroids)
        if stats is None:
            stats = (np.zeros(len(names)), np.ones(len(names)))
        if not len(self._rows) and self._rows.shape("unit") != centroids.shape[1:]:
            self._rows.reshape("unit", centroids.shape[1:])  # an index built empty learns the dimension
        return self._rows.put(ids, names, unit=normalise_rows(centroids), enroll_mean=stats[0], enroll_std=stats[1])

    def scores(self, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Raw cosine, AS-norm score and LLR of ``embedding`` against every speaker ``[N]``
        (None where there is no cohort or no calibration). Exact, whatever the index."""
        with self._lock:
            return self._scores(normalise_rows(embedding), None)

    def _raw(self, probe: np.ndarray, rows: np.ndarray | None) -> np.ndarray:
        """Cosines with ``rows`` (None: every row, without copying the matrix)."""
        if rows is None:  # block by block: the rows are never copied
            raw = np.concatenate([block @ probe for block in self._rows.blocks("unit")] or [np.zeros(0)])
        else:
            raw = self._rows.take("unit", rows) @ probe
        raw = raw.astype(np.float64)
        if self._prototypes is not None and len(self._prototypes[0]):
            owner, vectors = self._prototypes
            best = np.full(len(self._rows), -np.inf)
            np.maximum.at(best, owner, normalise_rows(vectors) @ probe)
            raw = np.maximum(raw, best if rows is None else best[rows])
        return raw

    def _scores(self, probe: np.ndarray, rows: np.ndarray | None):
        raw = self._raw(probe, rows)
        normalised = llr = None
        if self._cohort is not None and len(raw):
            names = self._rows.names if rows is None else [self._rows.names[r] for r in rows]
            t_mean, t_std = self._cohort.test_stats(probe, names, positions={name: i for i, name in enumerate(names)})
            e_mean, e_std = (self._rows.array(c) if rows is None else self._rows.take(c, rows) for c in ("enroll_mean", "enroll_std"))
            normalised = asnorm(raw, e_mean, e_std, t_mean, t_std)
            if self._calibration is not None:
                llr = self._calibration.llr(normalised)
        return raw, normalised, llr

    def search(self, embedding: np.ndarray, k: int = 5) -> list[Hit]:
        """The ``k`` best speakers by raw cosine, best first (fewer if fewer are enrolled),
        each with its score on every scale this index can compute.

        Ranked by cosine, not by the normalised score: AS-norm's per-speaker statistics
        reorder speakers and cost 2.4 points of top-1 accuracy on speechocean762, while
        deciding on the normalised score of the cosine winner keeps all of its gain
        (bench/decisions.py). Only the ``k`` best are normalised.
        """
        if k <= 0:
            return []
        probe = normalise_rows(embedding)
        with self._lock:
            if not len(self._rows):
                return []
            if self._ann is not None:
                found = self._ann.search(probe, max(k, CANDIDATES))
                rows = np.array([self._rows.at[int(key)] for key in found], dtype=np.int64)
                top = rows[_best(self._raw(probe, rows), min(k, len(rows)))]
            else:
                top = _best(self._raw(probe, None), min(k, len(self._rows)))
            raw, normalised, llr = self._scores(probe, top)
            return [
                Hit(
                    self._rows.names[r],
                    float(raw[i]),
                    None if normalised is None else float(normalised[i]),
                    None if llr is None else float(llr[i]),
                )
                for i, r in enumerate(top)
            ]

    def recall(self, probes: np.ndarray) -> float | None:
        """Recall@1 of the approximate search against exact search on ``probes``: the share
        whose best speaker by exact cosine it finds. None for an exact index or no probes."""
        if self._ann is None or not len(probes):
            return None
        units = normalise_rows(probes)
        with self._lock:
            best, where, start = np.full(len(units), -np.inf), np.zeros(len(units), dtype=np.int64), 0
            for block in self._rows.blocks("unit"):  # a block at a time: [probes, N] could be gigabytes
                scores = units @ block.T
                top = np.argmax(scores, axis=1)
                better = scores[np.arange(len(units)), top] > best
                best[better], where[better] = scores[better, top[better]], start + top[better]
                start += len(block)
            expected = [self._rows.names[i] for i in where]
        found = [hits[0].speaker if (hits := self.search(p, 1)) else None for p in units]
        return float(np.mean([f == e for f, e in zip(found, expected)]))


def _best(raw: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest scores, best first (ties: the earlier row)."""
    top = np.argpartition(-raw, k - 1)[:k]
    return top[np.argsort(-raw[top], kind="stable")]
