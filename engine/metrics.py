"""Evaluation metrics: equal error rate, d' and identification accuracy.

Scores are "higher means more likely the same speaker" (cosines, LLRs).
"""

from __future__ import annotations

import numpy as np


def eer(target: np.ndarray, nontarget: np.ndarray) -> tuple[float, float]:
    """Equal error rate and the threshold where it occurs.

    A trial is accepted when its score is ``>= threshold``. The miss rate (targets
    rejected) rises and the false-alarm rate (non-targets accepted) falls as the
    threshold moves up through the sorted scores; the EER is where the two curves cross,
    taken as the mean of the two rates at the threshold where they are closest.

    >>> eer(np.array([0.9, 0.8, 0.7]), np.array([0.1, 0.2, 0.3]))
    (0.0, 0.7)
    >>> eer(np.array([0.9, 0.8, 0.7, 0.3]), np.array([0.6, 0.2, 0.1, 0.05]))  # one error each side
    (0.25, 0.6)
    """
    target = np.asarray(target, dtype=np.float64).ravel()
    nontarget = np.asarray(nontarget, dtype=np.float64).ravel()
    if target.size == 0 or nontarget.size == 0:
        raise ValueError("EER needs at least one target and one non-target score")
    thresholds = np.unique(np.concatenate([target, nontarget]))
    # Vectorised counts through sorted arrays: O((T + N) log(T + N)), no Python loop.
    miss = np.searchsorted(np.sort(target), thresholds, side="left") / target.size
    false_alarm = 1.0 - np.searchsorted(np.sort(nontarget), thresholds, side="left") / nontarget.size
    best = int(np.argmin(np.abs(miss - false_alarm)))
    return float((miss[best] + false_alarm[best]) / 2), float(thresholds[best])


def d_prime(target: np.ndarray, nontarget: np.ndarray) -> float:
    """How far apart target and non-target scores lie, in pooled standard deviations.

    ``(mean(target) - mean(nontarget)) / sqrt((var(target) + var(nontarget)) / 2)``, with
    sample variances. Continuous where EER is not: two models that both separate a small
    set perfectly (EER 0) still differ in how widely they separate it.

    >>> round(d_prime(np.array([0.8, 0.9, 1.0]), np.array([0.1, 0.2, 0.3])), 6)
    7.0
    """
    target = np.asarray(target, dtype=np.float64).ravel()
    nontarget = np.asarray(nontarget, dtype=np.float64).ravel()
    if target.size < 2 or nontarget.size < 2:
        raise ValueError("d' needs at least two target and two non-target scores")
    spread = np.sqrt((target.var(ddof=1) + nontarget.var(ddof=1)) / 2)
    return float((target.mean() - nontarget.mean()) / max(spread, 1e-12))


def top_k_accuracy(scores: np.ndarray, truth: np.ndarray, k: int = 1) -> float:
    """Fraction of rows of ``scores [probes, classes]`` whose true class is among the k best.

    >>> top_k_accuracy(np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]]), np.array([0, 1, 1]))
    0.6666666666666666
    """
    scores = np.asarray(scores)
    truth = np.asarray(truth)
    if scores.ndim != 2 or len(scores) != len(truth):
        raise ValueError(f"scores {scores.shape} and truth {truth.shape} do not match")
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(best == truth[:, None], axis=1)))
