"""DET curves and score histograms, drawn the way the field reads them.

A :class:`DetScores` holds one version's target and non-target trial scores on one
back-end and the thresholds it decides with, whoever made the trials: ``voiceprint eval``
on a labelled set (:meth:`voiceprint.engine.evaluation.EvalReport.det`) or the version's
own leave-one-out calibration trials (the console's calibration view).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voiceprint.engine.metrics import eer, error_rates

# Both DET axes run from 0.1 % to 50 %: where operating points are read. Past 50 % a
# system is worse than chance on that axis; under 0.1 % few test sets hold enough trials.
DET_RANGE = (0.001, 0.5)
DET_TICKS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
SCALE_NAMES = {"cosine": "cosine score", "asnorm": "AS-norm score", "asnorm+calibrated": "LLR"}


@dataclass(frozen=True)
class DetScores:
    """Trial scores of ``version`` on ``backend`` and the thresholds it decides with."""

    version: int
    backend: str  # cosine, asnorm or asnorm+calibrated: the scale of the scores and thresholds
    target: np.ndarray
    nontarget: np.ndarray
    verify_threshold: float
    identify_threshold: float
    trials: str = "trials"  # whose trials these are, for the title

    @property
    def eer(self) -> float:
        return eer(self.target, self.nontarget)[0]


def det_marks(scores: DetScores) -> dict[str, tuple[float, float]]:
    """The points a DET plot marks, as (false-accept rate, miss rate): the EER, and the
    operating point of each threshold the version decides with."""
    target, nontarget, rate = scores.target, scores.nontarget, scores.eer
    marks = {f"EER {rate:.2%}": (rate, rate)}
    for task, cut in (("verify", scores.verify_threshold), ("identify", scores.identify_threshold)):
        marks[f"{task} threshold {cut:.3f}"] = (float(np.mean(nontarget >= cut)), float(np.mean(target < cut)))
    return marks


def figure(scores: DetScores):
    """The DET curve (normal-deviate axes over :data:`DET_RANGE`, the EER and the thresholds'
    operating points marked) beside the score histograms, as a matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from scipy.stats import norm

    target, nontarget = scores.target, scores.nontarget
    _, miss, fa = error_rates(target, nontarget)
    low, high = norm.ppf(DET_RANGE)
    # A rate of 0 or 1 has no probit: such points sit just outside the axes, which cut them off.
    probit = lambda x: norm.ppf(np.clip(x, DET_RANGE[0] / 2, 1 - DET_RANGE[0] / 2))  # noqa: E731
    fig, (det, hist) = plt.subplots(1, 2, figsize=(11, 4.5))
    det.plot(probit(fa), probit(miss), label="DET")
    for (label, (x, y)), marker in zip(det_marks(scores).items(), ("o", "s", "^")):
        shown = np.clip(probit(np.array([x, y])), low, high)  # a point off the axes is drawn on its edge
        off = " (off the axes)" if not (DET_RANGE[0] <= x <= DET_RANGE[1] and DET_RANGE[0] <= y <= DET_RANGE[1]) else ""
        det.plot(*shown, marker=marker, linestyle="none", markersize=8,
                 label=f"{label}: FA {x:.2%}, miss {y:.2%}{off}")
    det.set_xlim(low, high)
    det.set_ylim(low, high)
    det.set_xticks(norm.ppf(DET_TICKS), [f"{t * 100:g}%" for t in DET_TICKS])
    det.set_yticks(norm.ppf(DET_TICKS), [f"{t * 100:g}%" for t in DET_TICKS])
    det.set_xlabel("false-accept rate")
    det.set_ylabel("miss rate")
    det.set_title(f"DET, version {scores.version}, {scores.backend}, {scores.trials}", fontsize=10)
    det.grid(True, alpha=0.3)
    det.legend(fontsize=7, loc="lower left")  # a DET curve runs from upper left to lower right
    bins = np.linspace(min(target.min(), nontarget.min()), max(target.max(), nontarget.max()), 50)
    hist.hist(nontarget, bins=bins, density=True, alpha=0.6, label=f"non-target ({len(nontarget)})")
    hist.hist(target, bins=bins, density=True, alpha=0.6, label=f"target ({len(target)})")
    hist.axvline(scores.verify_threshold, color="k", linestyle="--", label="verify threshold")
    hist.axvline(scores.identify_threshold, color="k", linestyle=":", label="identify threshold")
    hist.set_xlabel(SCALE_NAMES.get(scores.backend, scores.backend))
    hist.legend(fontsize=8)
    fig.tight_layout()
    return fig


def png(scores: DetScores, dpi: int = 100) -> bytes:
    """:func:`figure` as PNG bytes."""
    import matplotlib.pyplot as plt

    fig = figure(scores)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=dpi)
    plt.close(fig)
    return out.getvalue()


def plot(scores: DetScores, path: Path) -> None:
    """:func:`figure`, written as a PNG file."""
    Path(path).write_bytes(png(scores, dpi=120))
