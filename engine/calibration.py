"""Calibration: what a version's scores mean, and the thresholds that decide.

One recipe, fitted on leave-one-out trials of the stored enrollments (each probe is a
stored utterance, scored against every profile, its own speaker's profile rebuilt
without it; see :mod:`voiceprint.engine.trials`):

1. **Duplicate identities** (:func:`voiceprint.engine.trials.likely_duplicates`). Two profiles
   that hold the same recording, or whose speakers' utterances score against each
   other the way a typical speaker's own do, are reported, and their cross trials are
   left out. Left in, one such pair is the highest "non-target" score and can set
   every threshold.
2. **The LLR map** (:func:`fit_llr`). Prior-weighted logistic regression on AS-norm
   scores, with Platt's correction of the labels for the number of trials: a small
   population that happens to separate perfectly gets bounded LLRs, not a Cllr of 0
   and thresholds ten nats away.
3. **Thresholds at a requested false-accept rate** (:func:`far_threshold`). The
   empirical quantile when the trials can measure the rate (ten or more expected false
   accepts); otherwise a robust model of the non-target tail, fitted from the median and
   the quartiles, which a single outlier cannot move far: normal for single trials,
   Gumbel for the best score among a gallery (a maximum).
4. **A growing gallery** (:func:`identify_threshold`). The best of N strangers' scores
   grows with ln N (the Gumbel law is max-stable), so the identify threshold rises by
   ``beta * ln(N / N_fit)`` once more speakers are enrolled than at the fit.
5. **What to expect on new people** (:func:`cross_validated_rate`). The thresholds are
   refitted with each fifth of the speakers held out and applied to them. The false
   accepts counted there estimate the rate on speakers the fit never saw. It is reported
   with a 95 % upper bound that treats speakers, not trials, as the independent unit.

Before any calibration, :func:`reference_thresholds` derives thresholds from the
encoder's reference measurement (non-target cosines of a reference population, shipped
with the encoder), again stricter for identification as the gallery grows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit
from scipy.stats import beta as beta_distribution
from scipy.stats import norm

from voiceprint.engine.metrics import eer
from voiceprint.engine.trials import TrialScores

# Below this many expected false accepts an empirical quantile rests on one or two scores.
MIN_EXPECTED_FALSE_ACCEPTS = 10
FOLDS = 5  # speaker folds of the cross-validated rate
_NORMAL_MAD = 1.4826  # median absolute deviation -> standard deviation, for normal scores
# Distance between the quartiles of a standard Gumbel: ln ln 4 - ln ln (4/3).
_GUMBEL_QUARTILES = math.log(math.log(4.0)) - math.log(math.log(4.0 / 3.0))
_GUMBEL_MEDIAN = -math.log(math.log(2.0))  # the median of a standard Gumbel


# -- thresholds ----------------------------------------------------------------------------


def threshold_at_far(nontarget: np.ndarray, far: float) -> float:
    """The smallest threshold whose false-accept rate on ``nontarget`` is at most ``far``
    (scores at or above the threshold are accepted).

    >>> threshold_at_far(np.arange(100.0), 0.05)
    95.0
    """
    scores = np.sort(np.asarray(nontarget, dtype=np.float64))
    if scores.size == 0:
        raise ValueError("no non-target scores")
    if not 0.0 < far < 1.0:
        raise ValueError("the false-accept rate must lie in (0, 1)")
    allowed = int(math.floor(far * scores.size))  # how many non-targets may pass
    if allowed == 0:
        return float(np.nextafter(scores[-1], np.inf))
    candidate = scores[-allowed]
    # Ties at the cut would let more than `allowed` through: step just above them.
    if np.count_nonzero(scores >= candidate) > allowed:
        candidate = np.nextafter(candidate, np.inf)
    return float(candidate)


def tail_fit(scores: np.ndarray, tail: str) -> tuple[float, float]:
    """Location and scale of a ``"normal"`` or ``"gumbel"`` law, from the median and the
    spread of the middle half (robust: one outlier moves neither).

    >>> loc, scale = tail_fit(np.random.default_rng(0).normal(2.0, 0.5, 20000), "normal")
    >>> round(loc, 1), round(scale, 1)
    (2.0, 0.5)
    """
    scores = np.asarray(scores, dtype=np.float64)
    median = float(np.median(scores))
    if tail == "normal":
        return median, max(_NORMAL_MAD * float(np.median(np.abs(scores - median))), 1e-6)
    if tail == "gumbel":
        q25, q75 = np.quantile(scores, [0.25, 0.75])
        scale = max(float(q75 - q25) / _GUMBEL_QUARTILES, 1e-6)
        return median - _GUMBEL_MEDIAN * scale, scale
    raise ValueError(f"unknown tail {tail!r}")


def tail_quantile(loc: float, scale: float, far: float, tail: str) -> float:
    """The score exceeded with probability ``far`` under the fitted law.

    >>> round(tail_quantile(0.0, 1.0, 0.01, "normal"), 3)
    2.326
    >>> round(tail_quantile(0.0, 1.0, 0.01, "gumbel"), 3)
    4.6
    """
    if tail == "normal":
        return loc + scale * float(norm.isf(far))
    return loc - scale * math.log(-math.log1p(-far))


def far_threshold(scores: np.ndarray, far: float, tail: str) -> tuple[float, str]:
    """The threshold at false-accept rate ``far`` and how it was found: ``"measured"``
    (the empirical quantile, when the trials hold at least ten expected false accepts)
    or ``"modelled"`` (the fitted tail, when they are too few to measure the rate)."""
    scores = np.asarray(scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if scores.size == 0:
        raise ValueError("no non-target scores")
    if scores.size * far >= MIN_EXPECTED_FALSE_ACCEPTS:
        return threshold_at_far(scores, far), "measured"
    return tail_quantile(*tail_fit(scores, tail), far, tail), "modelled"


def identify_threshold(cut: dict, gallery: int, fitted_gallery: int) -> float:
    """A version's identify threshold for a gallery of ``gallery`` speakers: the fitted one,
    raised by ``beta * ln(gallery / fitted_gallery)`` once the gallery has grown (never
    lowered: a smaller gallery keeps the stricter cut).

    >>> round(identify_threshold({"identify": 0.5, "identify_beta": 0.1}, 1000, 100), 4)
    0.7303
    """
    grown = max(gallery, 1) / max(fitted_gallery, 1)
    return float(cut["identify"]) + float(cut.get("identify_beta", 0.0)) * math.log(max(grown, 1.0))


def upper_bound(false_accepts: np.ndarray, trials: np.ndarray, seed: int = 0) -> float:
    """A 95 % upper bound on the false-accept rate behind per-speaker counts.

    The larger of a speaker-level bootstrap (trials of one speaker are not independent)
    and the exact binomial bound (Clopper-Pearson) for the total, which stays above zero
    when no false accept was seen.
    """
    fa, n = np.asarray(false_accepts, dtype=np.float64), np.asarray(trials, dtype=np.float64)
    k, total = int(fa.sum()), int(n.sum())
    exact = 1.0 if k >= total else float(beta_distribution.ppf(0.95, k + 1, total - k))
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(n), size=(1000, len(n)))
    rates = fa[picks].sum(axis=1) / np.maximum(n[picks].sum(axis=1), 1)
    return max(exact, float(np.quantile(rates, 0.95)))


def cross_validated_rate(scores: np.ndarray, groups: np.ndarray, far: float, tail: str, seed: int = 0) -> dict | None:
    """The false-accept rate the thresholding recipe gives on speakers it never saw.

    The probe speakers (``groups``) are split into :data:`FOLDS` folds; the threshold is
    fitted on the others' trials and counted on each fold's. None with fewer than two
    speakers.
    """
    scores, groups = np.asarray(scores, dtype=np.float64), np.asarray(groups)
    finite = np.isfinite(scores)
    scores, groups = scores[finite], groups[finite]
    names, member = np.unique(groups, return_inverse=True)
    if len(names) < 2:
        return None
    fold = np.random.default_rng(seed).permutation(len(names)) % min(FOLDS, len(names))
    false_accepts = np.zeros(len(names))
    for k in np.unique(fold):
        held = fold[member] == k
        if held.all() or not held.any():
            continue
        cut, _ = far_threshold(scores[~held], far, tail)
        np.add.at(false_accepts, member[held], scores[held] >= cut)
    trials = np.bincount(member, minlength=len(names)).astype(np.float64)
    return {
        "rate": float(false_accepts.sum() / trials.sum()),
        "bound": upper_bound(false_accepts, trials, seed),
        "trials": int(trials.sum()),
        "speakers": int(len(names)),
    }


def reference_thresholds(reference: dict, verify_far: float, identify_far: float, gallery: int) -> dict:
    """Cosine thresholds before a version is calibrated, from the encoder's reference
    measurement ``{"mean": m, "std": s}`` of non-target cosines (utterance against a
    profile of another speaker): verify at ``verify_far`` per trial; identify at
    ``identify_far`` per search among ``gallery`` speakers, treated as independent
    trials (conservative: real scores are correlated, so the best of N grows slower).

    >>> cuts = reference_thresholds({"mean": 0.5, "std": 0.1}, 0.01, 0.01, 1)
    >>> round(cuts["verify"], 3), round(cuts["identify"], 3)
    (0.733, 0.733)
    >>> reference_thresholds({"mean": 0.5, "std": 0.1}, 0.01, 0.01, 100)["identify"] > 0.8
    True
    """
    per_trial = -math.expm1(math.log1p(-identify_far) / max(gallery, 1))  # 1 - (1 - far)^(1/N)
    return {
        "verify": reference["mean"] + reference["std"] * float(norm.isf(verify_far)),
        "identify": reference["mean"] + reference["std"] * float(norm.isf(per_trial)),
    }


# -- the LLR map -----------------------------------------------------------------------------


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def bayes_threshold(p_target: float, c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    """The LLR above which accepting costs less than rejecting, in expectation.

    >>> round(bayes_threshold(0.01), 3)
    4.595
    >>> bayes_threshold(0.5) == 0.0
    True
    """
    return -logit(effective_prior(p_target, c_miss, c_fa))


def effective_prior(p_target: float, c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    """The one prior that stands for (p_target, C_miss, C_fa) in a binary decision."""
    if not 0.0 < p_target < 1.0 or c_miss <= 0 or c_fa <= 0:
        raise ValueError("p_target must lie in (0, 1) and the costs must be positive")
    return p_target * c_miss / (p_target * c_miss + (1.0 - p_target) * c_fa)


def fit_llr(target: np.ndarray, nontarget: np.ndarray, prior: float = 0.5) -> tuple[float, float]:
    """Slope and offset of ``llr = slope * score + offset``, by prior-weighted logistic regression.

    Each class is weighted to carry ``prior`` and ``1 - prior`` of the total, so the
    result does not depend on how many trials of each kind there are (as in the BOSARIS
    toolkit). The labels are Platt's ``(n + 1) / (n + 2)`` and ``1 / (n + 2)`` rather than
    1 and 0: with few trials that separate perfectly, plain labels drive the slope to
    infinity, while these bound the LLRs by about ``ln n`` nats.
    """
    target = np.asarray(target, dtype=np.float64)
    nontarget = np.asarray(nontarget, dtype=np.float64)
    if target.size == 0 or nontarget.size == 0:
        raise ValueError("calibration needs both target and non-target trials")
    shift = logit(prior)
    y_target, y_non = (target.size + 1) / (target.size + 2), 1.0 / (nontarget.size + 2)

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = params
        lt, ln = a * target + b + shift, a * nontarget + b + shift
        value = -prior * (y_target * log_expit(lt) + (1 - y_target) * log_expit(-lt)).mean()
        value -= (1 - prior) * (y_non * log_expit(ln) + (1 - y_non) * log_expit(-ln)).mean()
        gt = prior * (expit(lt) - y_target) / target.size  # d value / d lt
        gn = (1 - prior) * (expit(ln) - y_non) / nontarget.size
        grad = np.array([gt @ target + gn @ nontarget, gt.sum() + gn.sum()])
        return float(value), grad

    spread = max(float(np.std(np.concatenate([target, nontarget]))), 1e-6)
    result = minimize(loss, np.array([1.0 / spread, 0.0]), jac=True, method="L-BFGS-B")
    slope, offset = (float(v) for v in result.x)
    return slope, offset


def cllr(target_llr: np.ndarray, nontarget_llr: np.ndarray) -> float:
    """Log-likelihood-ratio cost in bits: 0 is perfect, 1 is an LLR that says nothing."""
    t = np.asarray(target_llr, dtype=np.float64)
    n = np.asarray(nontarget_llr, dtype=np.float64)
    return float((np.logaddexp(0, -t).mean() + np.logaddexp(0, n).mean()) / (2 * math.log(2)))


@dataclass(frozen=True)
class Calibration:
    """What a version's scores mean: stored with the version, refitted as data grows.

    ``thresholds[backend]`` holds ``{"verify": t, "identify": t, "identify_beta": b}`` on
    that back-end's scale (cosine, AS-norm score, LLR); the identify threshold holds for
    a gallery of ``trials["speakers"]`` and grows with it (:func:`identify_threshold`).
    ``fit[backend]`` says how each threshold was found and what false-accept rate to
    expect on new speakers, with its bound; ``fit["duplicates"]`` lists the pairs of
    profiles that scored like one person.
    """

    version: int
    slope: float | None  # None when there was no cohort to normalise with
    offset: float | None
    thresholds: dict
    settings: dict  # the [scoring] values the fit used (cohort size, FARs, costs)
    trials: dict  # {"target": n, "nontarget": n, "identify": n, "speakers": n, "utterances": n}
    fit: dict = field(default_factory=dict)  # EER, Cllr, bases, expected rates, duplicates, notes
    id: int | None = None
    created_at: str | None = None

    def llr(self, normalised: np.ndarray | float) -> np.ndarray | float:
        return self.slope * normalised + self.offset

    def identify_threshold(self, backend: str, gallery: int) -> float:
        return identify_threshold(self.thresholds[backend], gallery, self.trials["speakers"])

    def to_params(self) -> dict:
        out = asdict(self)
        for key in ("version", "id", "created_at"):
            out.pop(key)
        return out

    @classmethod
    def from_params(cls, version: int, params: dict, *, id: int | None = None, created_at: str | None = None) -> Calibration:
        return cls(version=version, id=id, created_at=created_at, **params)


# Long on purpose: the LLR fit and each back-end's thresholds read as one recipe.
def fit_calibration(version: int, trials: TrialScores, settings: dict) -> Calibration:
    """Fit the LLR map and every back-end's thresholds on leave-one-out trials.

    ``settings``: ``verify_far`` and ``identify_far`` (the false-accept rates the
    thresholds are set at), ``decision`` ("far" or "cost"), and ``p_target``, ``c_miss``,
    ``c_fa`` for cost-based LLR thresholds.
    """
    if trials.nontarget["cosine"].size == 0:
        raise ValueError("calibration needs at least two enrolled speakers whose profiles do not score like one person")
    verify_far, identify_far = settings["verify_far"], settings["identify_far"]
    scales = dict(trials.target), dict(trials.nontarget), dict(trials.identify)
    slope = offset = None  # no cohort, no LLR
    if "asnorm" in trials.target:
        slope, offset = fit_llr(trials.target["asnorm"], trials.nontarget["asnorm"])
        for table, source in zip(scales, (trials.target, trials.nontarget, trials.identify)):
            table["asnorm+calibrated"] = slope * source["asnorm"] + offset
    thresholds, fit = {}, {}
    for backend in scales[0]:
        tar, non, best = scales[0][backend], scales[1][backend], scales[2][backend]
        finite = np.isfinite(best)
        open_set = best[finite] if finite.any() else non
        groups = trials.probe_owner[finite] if finite.any() else trials.nontarget_owner
        verify, verify_basis = far_threshold(non, verify_far, "normal")
        identify, identify_basis = far_threshold(open_set, identify_far, "gumbel")
        cut = {"verify": verify, "identify": identify, "identify_beta": tail_fit(open_set, "gumbel")[1]}
        report = {"eer": eer(tar, non)[0], "verify_basis": verify_basis, "identify_basis": identify_basis}
        if backend == "asnorm+calibrated" and settings["decision"] == "cost":
            cost = bayes_threshold(settings["p_target"], settings["c_miss"], settings["c_fa"])
            cut = {"verify": cost, "identify": cost, "identify_beta": 0.0}
            report.update(verify_basis="cost", identify_basis="cost")
        else:
            report["verify_expected"] = cross_validated_rate(non, trials.nontarget_owner, verify_far, "normal")
            report["identify_expected"] = cross_validated_rate(open_set, groups, identify_far, "gumbel")
        if backend == "cosine" and "consistency_hold_rate" in settings:
            # Enrollment consistency: the cosine below which this share of a speaker's own
            # utterances fall when its profile is young (they are held for review).
            cut["consistency"] = float(np.quantile(trials.young_target, settings["consistency_hold_rate"]))
        # Genuine probes that identification would name: own profile first and above the cut.
        report["identified"] = float(np.mean(trials.top1 & (tar >= cut["identify"])))
        thresholds[backend], fit[backend] = cut, report
    if "asnorm+calibrated" in scales[0]:
        fit["asnorm+calibrated"]["cllr"] = cllr(scales[0]["asnorm+calibrated"], scales[1]["asnorm+calibrated"])
    fit["duplicates"] = [{"speakers": [a, b], "score": s} for a, b, s in trials.duplicates]
    fit["notes"] = _notes(trials, settings)
    return Calibration(
        version=version,
        slope=slope,
        offset=offset,
        thresholds=thresholds,
        settings=dict(settings),
        trials={
            "target": int(trials.target["cosine"].size),
            "nontarget": int(trials.nontarget["cosine"].size),
            "identify": int(np.isfinite(trials.identify["cosine"]).sum()),
            "speakers": trials.speakers,
            "utterances": trials.utterances,
        },
        fit=fit,
    )


def _notes(trials: TrialScores, settings: dict) -> list[str]:
    """What an operator should know about a fit: rates too rare to measure, duplicates."""
    notes = []
    for task, count, far in (
        ("verify", trials.nontarget["cosine"].size, settings["verify_far"]),
        ("identify", int(np.isfinite(trials.identify["cosine"]).sum()), settings["identify_far"]),
    ):
        if count * far < MIN_EXPECTED_FALSE_ACCEPTS:
            notes.append(
                f"{count} {task} non-target trials cannot measure a {far:.1%} false-accept rate "
                f"(about {math.ceil(MIN_EXPECTED_FALSE_ACCEPTS / far)} are needed): the {task} thresholds come "
                "from a model of the non-target tail; enroll more speakers and calibrate again"
            )
    for a, b, score in trials.duplicates:
        notes.append(
            f"{a!r} and {b!r} score like one person (cosine {score:.2f}); their trials against each other "
            "were left out: if they are one speaker, erase one of the two profiles"
        )
    return notes
