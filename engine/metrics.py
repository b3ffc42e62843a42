"""Evaluation metrics: error rates, EER, minDCF, d', identification accuracy, forgetting,
diarization error rate.

Scores are "higher means more likely the same speaker" (cosines, LLRs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def error_rates(target: np.ndarray, nontarget: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Miss and false-alarm rates at every distinct score used as a threshold.

    A trial is accepted when its score is ``>= threshold``. Returns ``(thresholds, miss,
    false_alarm)``, thresholds ascending: the miss rate (targets rejected) rises and the
    false-alarm rate (non-targets accepted) falls along them. Vectorised through sorted
    arrays: O((T + N) log(T + N)), no Python loop.

    >>> thresholds, miss, fa = error_rates(np.array([0.9, 0.4]), np.array([0.5, 0.1]))
    >>> thresholds.tolist(), miss.tolist(), fa.tolist()
    ([0.1, 0.4, 0.5, 0.9], [0.0, 0.0, 0.5, 0.5], [1.0, 0.5, 0.5, 0.0])
    """
    target = np.asarray(target, dtype=np.float64).ravel()
    nontarget = np.asarray(nontarget, dtype=np.float64).ravel()
    if target.size == 0 or nontarget.size == 0:
        raise ValueError("error rates need at least one target and one non-target score")
    thresholds = np.unique(np.concatenate([target, nontarget]))
    miss = np.searchsorted(np.sort(target), thresholds, side="left") / target.size
    false_alarm = 1.0 - np.searchsorted(np.sort(nontarget), thresholds, side="left") / nontarget.size
    return thresholds, miss, false_alarm


def eer(target: np.ndarray, nontarget: np.ndarray) -> tuple[float, float]:
    """Equal error rate and the threshold where it occurs.

    The EER is where the miss and false-alarm curves cross, taken as the mean of the two
    rates at the threshold where they are closest.

    >>> eer(np.array([0.9, 0.8, 0.7]), np.array([0.1, 0.2, 0.3]))
    (0.0, 0.7)
    >>> eer(np.array([0.9, 0.8, 0.7, 0.3]), np.array([0.6, 0.2, 0.1, 0.05]))  # one error each side
    (0.25, 0.6)
    """
    thresholds, miss, false_alarm = error_rates(target, nontarget)
    best = int(np.argmin(np.abs(miss - false_alarm)))
    return float((miss[best] + false_alarm[best]) / 2), float(thresholds[best])


def min_dcf(
    target: np.ndarray, nontarget: np.ndarray, p_target: float, c_miss: float = 1.0, c_fa: float = 1.0
) -> tuple[float, float]:
    """Minimum normalised detection cost (NIST SRE) and the threshold that reaches it.

    ``DCF = c_miss * P_miss * p_target + c_fa * P_fa * (1 - p_target)``, divided by the
    cost of the better trivial system (accept all or reject all), so 1.0 means "no
    better than not listening". Also tried: accepting every trial (threshold below all
    scores) and rejecting every trial.

    >>> min_dcf(np.array([0.9, 0.8]), np.array([0.1, 0.2]), p_target=0.01)
    (0.0, 0.8)
    >>> round(min_dcf(np.array([0.9, 0.3]), np.array([0.5, 0.1]), p_target=0.5)[0], 6)  # one miss or one FA
    0.5
    """
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must be between 0 and 1, got {p_target}")
    thresholds, miss, false_alarm = error_rates(target, nontarget)
    # Rejecting everything: one step above the highest score.
    thresholds = np.append(thresholds, np.inf)
    miss, false_alarm = np.append(miss, 1.0), np.append(false_alarm, 0.0)
    cost = c_miss * miss * p_target + c_fa * false_alarm * (1 - p_target)
    best = int(np.argmin(cost))
    norm = min(c_miss * p_target, c_fa * (1 - p_target))
    return float(cost[best] / norm), float(thresholds[best])


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


def forgetting(matrix: np.ndarray) -> dict[str, float]:
    """Continual-learning summary of an accuracy matrix ``A[i][j]``: accuracy on task j
    after learning task i (only ``j <= i`` is used).

    - ``average_accuracy``: mean of the last row, every task after the last one;
    - ``forgetting``: for each earlier task, its best accuracy before the end minus its
      final accuracy, averaged (Chaudhry et al., 2018);
    - ``backward_transfer``: mean of ``A[T-1][j] - A[j][j]`` over earlier tasks (Lopez-Paz
      & Ranzato, 2017); negative means the later tasks cost the earlier ones.

    >>> forgetting(np.array([[0.9, np.nan], [0.8, 0.7]]))
    {'average_accuracy': 0.75, 'forgetting': 0.1, 'backward_transfer': -0.1}
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or len(matrix) == 0:
        raise ValueError(f"expected a square, non-empty task matrix, got shape {matrix.shape}")
    final = matrix[-1]
    earlier = range(len(matrix) - 1)
    if not len(earlier):
        return {"average_accuracy": round(float(final.mean()), 4), "forgetting": 0.0, "backward_transfer": 0.0}
    return {
        "average_accuracy": round(float(final.mean()), 4),
        "forgetting": round(float(np.mean([matrix[j:-1, j].max() - final[j] for j in earlier])), 4),
        "backward_transfer": round(float(np.mean([final[j] - matrix[j, j] for j in earlier])), 4),
    }


def diarization_error(
    reference: Sequence[tuple[float, float, str]],
    hypothesis: Sequence[tuple[float, float, str]],
    *,
    frame_s: float = 0.01,
    collar_s: float = 0.0,
) -> dict[str, float]:
    """Diarization error rate (NIST's definition) of ``(start, end, speaker)`` segments.

    Scored on frames of ``frame_s``: missed speech (reference speakers beyond the
    hypothesis's count in a frame), false alarm (the other way round) and confusion (the
    rest of the reference speakers not matched), all over the total reference speech;
    overlapping speech counts once per speaker. Hypothesis labels are mapped one to one
    onto reference labels to maximise their common time (Hungarian, SciPy). Frames within
    ``collar_s`` of a reference boundary are not scored. Seconds, and ``der`` as a share.

    >>> ref = [(0, 10, "a"), (10, 20, "b")]
    >>> diarization_error(ref, [(0, 10, "x"), (10, 20, "y")])["der"]
    0.0
    >>> e = diarization_error(ref, [(0, 15, "x"), (15, 20, "y")])
    >>> (round(e["confusion"], 2), e["missed"], e["false_alarm"], round(e["der"], 3))
    (5.0, 0.0, 0.0, 0.25)
    >>> e = diarization_error(ref, [(2, 10, "x"), (10, 22, "y")])
    >>> (round(e["missed"], 2), round(e["false_alarm"], 2), e["confusion"], round(e["der"], 3))
    (2.0, 2.0, 0.0, 0.2)
    >>> round(diarization_error([(0, 4, "a"), (2, 6, "b")], [(0, 6, "x")])["missed"], 2)   # overlap: one voice missed
    2.0
    """
    from scipy.optimize import linear_sum_assignment

    end = max([e for _, e, _ in reference] + [e for _, e, _ in hypothesis] + [0.0])
    frames = int(np.ceil(end / frame_s)) + 1

    def activity(segments):
        labels = sorted({s for _, _, s in segments})
        grid = np.zeros((len(labels), frames), dtype=bool)
        for start, stop, label in segments:
            grid[labels.index(label), int(round(start / frame_s)) : int(round(stop / frame_s))] = True
        return grid

    ref, hyp = activity(reference), activity(hypothesis)
    scored = np.ones(frames, dtype=bool)
    if collar_s > 0:
        for start, stop, _ in reference:
            for edge in (start, stop):
                scored[max(0, int(round((edge - collar_s) / frame_s))) : int(round((edge + collar_s) / frame_s))] = False
    ref, hyp = ref[:, scored], hyp[:, scored]
    n_ref, n_hyp = ref.sum(axis=0), hyp.sum(axis=0)
    correct = np.zeros(ref.shape[1])
    if len(ref) and len(hyp):
        common = ref.astype(np.int64) @ hyp.T.astype(np.int64)
        rows, cols = linear_sum_assignment(common, maximize=True)
        correct = (ref[rows] & hyp[cols]).sum(axis=0)
    total = float(n_ref.sum()) * frame_s
    missed = float(np.maximum(n_ref - n_hyp, 0).sum()) * frame_s
    false_alarm = float(np.maximum(n_hyp - n_ref, 0).sum()) * frame_s
    confusion = float((np.minimum(n_ref, n_hyp) - correct).sum()) * frame_s
    der = (missed + false_alarm + confusion) / total if total > 0 else float("nan")
    return {"der": der, "missed": missed, "false_alarm": false_alarm, "confusion": confusion, "total": total}
