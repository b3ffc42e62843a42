"""Scores and decisions: cosine, adaptive score normalisation, calibration, thresholds.

Three back-ends, chosen by ``[scoring] backend``:

``cosine``
    The raw cosine between a probe and a speaker's centroid.
``asnorm``
    Adaptive symmetric normalisation (AS-norm, Matejka et al. 2017): the cosine is
    standardised by the mean and spread of the ``top_k`` best cohort scores of the
    enrollment side and of the test side, and the two are averaged. It removes the
    speaker- and utterance-dependent offsets that make one cosine threshold fail on
    the next data set. The cohort is the engine's own data: stored utterances of the
    enrolled speakers (:class:`Cohort`), never the scored speaker's own.
``asnorm+calibrated``
    AS-norm followed by an affine map to a log-likelihood ratio fitted by logistic
    regression on target / non-target trials built leave-one-out from the stored
    enrollments (:mod:`voiceprint.engine.calibration`). An LLR means the same thing everywhere, so
    a decision can come from a cost (p_target, C_miss, C_fa) and not only from a rate.

Thresholds and the LLR map are fitted in :mod:`voiceprint.engine.calibration`; this module scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BACKENDS = ("cosine", "asnorm", "asnorm+calibrated")
_MIN_SPREAD = 1e-3  # a cohort whose top scores are all equal must not divide by zero


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero rather than becoming NaN)."""
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=-1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def centred(vectors: np.ndarray, centre: np.ndarray | None) -> np.ndarray:
    """Embeddings minus the domain centre (the mean of a version's enrolled embeddings).

    The pretrained encoder's embeddings all share one large common component: every
    cosine starts high, and a population from one domain (children's read English, a
    call centre) shares more of it. Removing the population's own mean before cosine
    scoring is the simplest in-domain back-end; on speechocean762 it lowers EER by a
    quarter for enrolled and never-enrolled speakers alike (README, "Scores and decisions").
    """
    return vectors if centre is None else np.asarray(vectors, dtype=np.float64) - centre


def cosine(embedding: np.ndarray, profiles: np.ndarray) -> np.ndarray:
    """Cosine between one embedding ``[D]`` and each profile row ``[N, D]`` -> ``[N]``.

    >>> [round(float(s), 3) for s in cosine(np.array([1.0, 0.0]), np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]))]
    [1.0, 0.0, 0.707]
    """
    return normalise_rows(profiles) @ normalise_rows(embedding)


# -- AS-norm -----------------------------------------------------------------------------


def top_k_stats(scores: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of the ``k`` largest scores of each row.

    ``scores`` is ``[P, M]``; entries where ``exclude`` is true take no part. Rows
    with fewer than ``k`` usable entries use those they have.

    >>> mean, std = top_k_stats(np.array([[0.1, 0.9, 0.5, 0.7]]), k=2)
    >>> round(float(mean[0]), 3), round(float(std[0]), 3)
    (0.8, 0.1)
    >>> top_k_stats(np.array([[0.1, 0.9, 0.5, 0.7]]), k=2, exclude=np.array([[0, 1, 0, 0]], bool))[0].round(3).tolist()
    [0.6]
    """
    scores = np.asarray(scores, dtype=np.float64)
    if exclude is not None:
        scores = np.where(exclude, -np.inf, scores)
    k = max(1, min(k, scores.shape[1]))
    top = -np.partition(-scores, k - 1, axis=1)[:, :k]
    usable = np.isfinite(top)
    n = np.maximum(usable.sum(axis=1), 1)
    top = np.where(usable, top, 0.0)
    mean = top.sum(axis=1) / n
    var = (np.where(usable, (top - mean[:, None]) ** 2, 0.0)).sum(axis=1) / n
    return mean, np.maximum(np.sqrt(var), _MIN_SPREAD)


@dataclass(frozen=True, eq=False)
class Cohort:
    """Unit-length embeddings of stored utterances, labelled by speaker, for AS-norm.

    Parameters
    ----------
    ids
        Utterance ids ``[M]`` (so a stored utterance scored as a probe can be left out).
    speakers
        The speaker of each row ``[M]``; a speaker's own rows never normalise its scores.
    vectors
        ``[M, D]`` embeddings (normalised here).
    top_k
        How many of the best cohort scores each side's statistics use.
    """

    ids: np.ndarray
    speakers: np.ndarray
    vectors: np.ndarray
    top_k: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", np.asarray(self.ids, dtype=np.int64))
        object.__setattr__(self, "speakers", np.asarray(self.speakers, dtype=object))
        object.__setattr__(self, "vectors", normalise_rows(self.vectors))
        _, counts = np.unique(self.speakers, return_counts=True)
        object.__setattr__(self, "_per_speaker", int(counts.max()) if counts.size else 0)

    def __len__(self) -> int:
        return len(self.ids)

    def enrollment_stats(self, names: list[str], profiles: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """Top-k cohort mean and spread of each speaker profile, leaving out its own rows."""
        means, stds = [], []
        unit = normalise_rows(profiles)
        labels = np.asarray(names, dtype=object)
        for start in range(0, len(labels), chunk):
            block = unit[start : start + chunk] @ self.vectors.T
            own = labels[start : start + chunk, None] == self.speakers[None, :]
            mean, std = top_k_stats(block, self.top_k, own)
            means.append(mean)
            stds.append(std)
        if not means:
            return np.zeros(0), np.zeros(0)
        return np.concatenate(means), np.concatenate(stds)

    def test_stats(
        self,
        probe: np.ndarray,
        candidates: list[str],
        *,
        exclude_id: int | None = None,
        exclude_speaker: str | None = None,
        positions: dict[str, int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k cohort mean and spread of one probe, for its trial with each candidate.

        The candidate's own rows are left out, as on the enrollment side: a genuine
        probe is then normalised against the same kind of cohort whether or not its
        speaker has utterances in it. ``exclude_id`` (the probe *is* that stored
        utterance) and ``exclude_speaker`` (pretend its speaker is not enrolled) leave
        out more, for leave-one-out calibration trials. Exact and vectorised: removing
        one speaker's rows (at most ``per_speaker`` of them) only reaches into the best
        ``top_k + per_speaker`` scores, so only candidates found there need their own
        statistics.
        """
        scores = (self.vectors @ normalise_rows(probe)).astype(np.float64)
        keep = np.ones(len(scores), dtype=bool)
        if exclude_id is not None:
            keep &= self.ids != exclude_id
        if exclude_speaker is not None:
            keep &= self.speakers != exclude_speaker
        scores = np.where(keep, scores, -np.inf)
        depth = min(len(scores), self.top_k + self._per_speaker)
        top = np.argpartition(-scores, depth - 1)[:depth]
        top = top[np.argsort(-scores[top], kind="stable")]
        values, labels = scores[top], self.speakers[top]
        usable = np.isfinite(values)
        distinct = np.unique(labels[usable]) if usable.any() else np.array([], dtype=object)
        # Row 0: no speaker left out; row 1 + u: distinct[u] left out.
        mask = np.vstack([usable[None, :], usable[None, :] & (labels[None, :] != distinct[:, None])])
        chosen = mask & (np.cumsum(mask, axis=1) <= self.top_k)
        n = np.maximum(chosen.sum(axis=1), 1)
        filled = np.where(chosen, values[None, :], 0.0)
        mean = filled.sum(axis=1) / n
        std = np.sqrt(np.where(chosen, (values[None, :] - mean[:, None]) ** 2, 0.0).sum(axis=1) / n)
        std = np.maximum(std, _MIN_SPREAD)
        # Every candidate gets row 0 but those found among the best scores.
        positions = positions if positions is not None else {name: i for i, name in enumerate(candidates)}
        pick = np.zeros(len(candidates), dtype=np.int64)
        for u, name in enumerate(distinct):
            at = positions.get(name)
            if at is not None:
                pick[at] = 1 + u
        return mean[pick], std[pick]


def asnorm(raw: np.ndarray, enroll_mean, enroll_std, test_mean, test_std) -> np.ndarray:
    """Symmetric normalisation of raw scores with enrollment- and test-side statistics.

    >>> float(asnorm(np.array(0.8), 0.4, 0.1, 0.6, 0.1))
    3.0
    """
    return 0.5 * ((raw - enroll_mean) / enroll_std + (raw - test_mean) / test_std)
