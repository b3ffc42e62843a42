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
    enrollments (:func:`fit_calibration`). An LLR means the same thing everywhere, so a
    decision can come from a cost (p_target, C_miss, C_fa) and not only from a rate.

Every back-end's threshold can be derived from a requested false-accept rate on the
calibration trials, so a threshold is a measured operating point rather than a guess.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_expit

from engine.metrics import eer

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


# -- calibration -------------------------------------------------------------------------


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
    result does not depend on how many trials of each kind there are (the usual
    choice for speaker-verification calibration, as in the BOSARIS toolkit).
    """
    target = np.asarray(target, dtype=np.float64)
    nontarget = np.asarray(nontarget, dtype=np.float64)
    if target.size == 0 or nontarget.size == 0:
        raise ValueError("calibration needs both target and non-target trials")
    shift = logit(prior)

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = params
        lt, ln = a * target + b + shift, a * nontarget + b + shift
        value = -prior * log_expit(lt).mean() - (1 - prior) * log_expit(-ln).mean()
        gt = -prior * (1 - expit(lt)) / target.size  # d value / d lt
        gn = (1 - prior) * expit(ln) / nontarget.size
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


@dataclass(frozen=True)
class Calibration:
    """What a version's scores mean: stored with the version, refitted as data grows.

    ``thresholds[backend]`` holds ``{"verify": t, "identify": t}`` on that back-end's
    scale (cosine, AS-norm score, LLR).
    """

    version: int
    slope: float | None  # None when there was no cohort to normalise with
    offset: float | None
    thresholds: dict
    settings: dict  # the [scoring] values the fit used (cohort size, FARs, costs)
    trials: dict  # {"target": n, "nontarget": n, "speakers": n, "utterances": n}
    fit: dict = field(default_factory=dict)  # EER and Cllr on the fitting trials
    id: int | None = None
    created_at: str | None = None

    def llr(self, normalised: np.ndarray | float) -> np.ndarray | float:
        return self.slope * normalised + self.offset

    def to_params(self) -> dict:
        out = asdict(self)
        for key in ("version", "id", "created_at"):
            out.pop(key)
        return out

    @classmethod
    def from_params(cls, version: int, params: dict, *, id: int | None = None, created_at: str | None = None) -> Calibration:
        return cls(version=version, id=id, created_at=created_at, **params)


# -- trials from the stored enrollments ----------------------------------------------------


@dataclass(frozen=True, eq=False)
class TrialScores:
    """Target and non-target scores of leave-one-out trials, on each back-end's scale.

    ``identify[backend]`` holds, per probe, the score of its best non-target by cosine:
    what an open-set search would have decided on had the probe's own speaker not been
    enrolled.
    """

    target: dict  # backend -> [T]
    nontarget: dict  # backend -> [F] (subsampled when the gallery is large)
    young_target: np.ndarray  # cosine of each probe with a profile of at most 3 other utterances
    identify: dict  # backend -> [P]
    speakers: int
    utterances: int


# Long on purpose: one pass builds every trial kind (target, non-target, best stranger,
# consistency) from the same scores; split, each part would recompute or pass them around.
def leave_one_out_trials(
    ids: np.ndarray,
    speakers: list[str],
    vectors: np.ndarray,
    cohort: Cohort | None,
    *,
    probes_per_speaker: int = 10,
    max_probes: int = 3000,
    max_nontarget: int = 500_000,
    seed: int = 0,
    centre: np.ndarray | None = None,
) -> TrialScores:
    """Score stored utterances against every enrolled profile, leaving each probe out of
    its own speaker's centroid (the centroid it would have been scored against had it
    arrived as a new utterance).

    Only speakers with two or more utterances give probes. With a cohort, the AS-norm
    statistics of a target trial use the leave-one-out centroid as well, and a probe
    never finds itself in the cohort. ``centre`` (the version's domain centre, see
    :func:`centred`) is subtracted before scoring, as at search time; the enrollment
    consistency trials stay on uncentred cosines, which is what the enrollment check
    computes.
    """
    rng = np.random.default_rng(seed)
    vectors = np.asarray(vectors, dtype=np.float64)
    names, index = np.unique(np.asarray(speakers, dtype=object), return_inverse=True)
    sums = np.zeros((len(names), vectors.shape[1]))
    np.add.at(sums, index, vectors)
    counts = np.bincount(index, minlength=len(names))
    probe_rows = []
    for j in np.flatnonzero(counts >= 2):
        rows = np.flatnonzero(index == j)
        probe_rows.extend(rng.permutation(rows)[:probes_per_speaker].tolist())
    if len(probe_rows) > max_probes:  # a large gallery: a random subset keeps the fit to seconds
        probe_rows = rng.choice(probe_rows, max_probes, replace=False).tolist()
    probe_rows = np.array(sorted(probe_rows), dtype=np.int64)
    if probe_rows.size == 0:
        raise ValueError("calibration needs speakers with at least two enrolled utterances")
    owner = index[probe_rows]
    probes = vectors[probe_rows]
    profiles = sums / counts[:, None]
    loo = (sums[owner] - probes) / (counts[owner] - 1)[:, None]
    # A new speaker's profile holds few utterances, and its own utterances score lower
    # against it than against a full one; the enrollment consistency cut is set on these.
    young = np.array([
        float(normalise_rows(vectors[rng.permutation(np.setdiff1d(np.flatnonzero(index == owner[p]), [row]))[:3]].mean(axis=0))
              @ normalise_rows(probes[p]))
        for p, row in enumerate(probe_rows)
    ])
    if centre is not None:
        probes, profiles, loo = centred(probes, centre), centred(profiles, centre), centred(loo, centre)

    backends = ["cosine"] + (["asnorm"] if cohort is not None else [])
    keep = min(1.0, max_nontarget / max(1, probe_rows.size * (len(names) - 1)))
    target = {b: [] for b in backends}
    nontarget = {b: [] for b in backends}
    best = {b: [] for b in backends}
    unit_profiles = normalise_rows(profiles)
    name_list = list(names)
    positions = {name: i for i, name in enumerate(name_list)}
    if cohort is not None:
        e_mean, e_std = cohort.enrollment_stats(name_list, profiles)
        loo_mean, loo_std = cohort.enrollment_stats(list(names[owner]), loo)
    for p, row in enumerate(probe_rows):
        own, probe = owner[p], probes[p]
        raw = (unit_profiles @ normalise_rows(probe)).astype(np.float64)
        raw[own] = float(normalise_rows(loo[p]) @ normalise_rows(probe))
        scales = {"cosine": raw}
        open_set = {"cosine": raw}
        if cohort is not None:
            uid = int(ids[row])
            # As the probe of an enrolled speaker: only the probe itself leaves the cohort.
            t_mean, t_std = cohort.test_stats(probe, name_list, exclude_id=uid, positions=positions)
            enroll_mean, enroll_std = e_mean.copy(), e_std.copy()
            enroll_mean[own], enroll_std[own] = loo_mean[p], loo_std[p]
            scales["asnorm"] = asnorm(raw, enroll_mean, enroll_std, t_mean, t_std)
            # As the probe of a stranger: its whole speaker leaves the cohort.
            s_mean, s_std = cohort.test_stats(probe, name_list, exclude_id=uid, exclude_speaker=names[own], positions=positions)
            open_set["asnorm"] = asnorm(raw, e_mean, e_std, s_mean, s_std)
        others = np.arange(len(names)) != own
        sample = others & (rng.random(len(names)) < keep)
        for b in backends:
            target[b].append(scales[b][own])
            nontarget[b].append(scales[b][sample])
            # Identification ranks by cosine and decides on the winner's score.
            best[b].append(open_set[b][np.flatnonzero(others)[np.argmax(raw[others])]] if others.any() else -np.inf)
    return TrialScores(
        target={b: np.array(v) for b, v in target.items()},
        nontarget={b: np.concatenate(v) for b, v in nontarget.items()},
        identify={b: np.array(v) for b, v in best.items()},
        young_target=young,
        speakers=len(names),
        utterances=len(ids),
    )


# Long on purpose: the LLR fit and each back-end's thresholds read as one recipe.
def fit_calibration(version: int, trials: TrialScores, settings: dict) -> Calibration:
    """Fit the LLR map and every back-end's thresholds on leave-one-out trials.

    ``settings``: ``verify_far`` and ``identify_far`` (the false-accept rates the
    thresholds are set at), ``decision`` ("far" or "cost"), and ``p_target``, ``c_miss``,
    ``c_fa`` for cost-based LLR thresholds.
    """
    if trials.nontarget["cosine"].size == 0:
        raise ValueError("calibration needs at least two enrolled speakers")
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
        if backend == "asnorm+calibrated" and settings["decision"] == "cost":
            cut = bayes_threshold(settings["p_target"], settings["c_miss"], settings["c_fa"])
            thresholds[backend] = {"verify": cut, "identify": cut}
        else:
            finite = best[np.isfinite(best)]
            thresholds[backend] = {
                "verify": threshold_at_far(non, verify_far),
                "identify": threshold_at_far(finite, identify_far) if finite.size else threshold_at_far(non, identify_far),
            }
            if backend == "cosine" and "consistency_hold_rate" in settings:
                # Enrollment consistency: the cosine below which this share of a speaker's
                # own utterances fall when its profile is young (they are held for review).
                thresholds[backend]["consistency"] = float(np.quantile(trials.young_target, settings["consistency_hold_rate"]))
        fit[backend] = {"eer": eer(tar, non)[0]}
    notes = []
    for task, count, far in (
        ("verify", trials.nontarget["cosine"].size, verify_far),
        ("identify", trials.identify["cosine"].size, identify_far),
    ):
        if count * far < 10:
            # Fewer than ~10 expected false accepts: the rate cannot be measured, only bounded.
            notes.append(
                f"{count} {task} non-target trials cannot measure a {far:.1%} false-accept rate "
                f"(about {math.ceil(10 / far)} are needed): the {task} thresholds sit at the top of the "
                "non-targets seen; enroll more speakers and calibrate again"
            )
    fit["notes"] = notes
    if "asnorm+calibrated" in scales[0]:
        fit["asnorm+calibrated"]["cllr"] = cllr(scales[0]["asnorm+calibrated"], scales[1]["asnorm+calibrated"])
    return Calibration(
        version=version,
        slope=slope,
        offset=offset,
        thresholds=thresholds,
        settings=dict(settings),
        trials={
            "target": int(trials.target["cosine"].size),
            "nontarget": int(trials.nontarget["cosine"].size),
            "speakers": trials.speakers,
            "utterances": trials.utterances,
        },
        fit=fit,
    )
