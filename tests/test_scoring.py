"""AS-norm, calibration and thresholds on synthetic scores whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from engine.index import CentroidIndex
from engine.scoring import (
    Cohort,
    asnorm,
    bayes_threshold,
    cllr,
    fit_calibration,
    fit_llr,
    leave_one_out_trials,
    threshold_at_far,
    top_k_stats,
)


def _brute_stats(scores: np.ndarray, k: int) -> tuple[float, float]:
    top = np.sort(scores)[::-1][:k]
    return float(top.mean()), float(top.std())


def test_cohort_statistics_leave_out_the_speakers_own_rows_and_the_probe_itself():
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((60, 8))
    speakers = [f"s{i % 6}" for i in range(60)]
    ids = np.arange(100, 160)
    cohort = Cohort(ids, speakers, vectors, top_k=7)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    profile = rng.standard_normal(8)
    mean, std = cohort.enrollment_stats(["s2"], profile[None, :])
    scores = unit @ (profile / np.linalg.norm(profile))
    others = np.array([s != "s2" for s in speakers])
    assert mean[0] == pytest.approx(_brute_stats(scores[others], 7)[0], abs=1e-6)
    assert std[0] == pytest.approx(_brute_stats(scores[others], 7)[1], abs=1e-6)

    probe = vectors[5]  # stored utterance id 105 (speaker s5) scored as a probe
    names = [f"s{i}" for i in range(6)] + ["stranger"]
    scores = unit @ unit[5]
    for exclude_speaker in (None, "s5"):
        t_mean, t_std = cohort.test_stats(probe, names, exclude_id=105, exclude_speaker=exclude_speaker)
        for i, name in enumerate(names):
            # Left out: the probe itself, the candidate's rows, and its own speaker when asked.
            usable = (ids != 105) & (np.array(speakers) != name) & (np.array(speakers) != exclude_speaker)
            assert t_mean[i] == pytest.approx(_brute_stats(scores[usable], 7)[0], abs=1e-6), (name, exclude_speaker)
            assert t_std[i] == pytest.approx(_brute_stats(scores[usable], 7)[1], abs=1e-6)


def test_asnorm_removes_speaker_and_utterance_offsets():
    """Raw scores carry a per-speaker and a per-probe offset; standardised with each
    side's statistics, one threshold separates targets from non-targets again."""
    rng = np.random.default_rng(2)
    n = 2000
    enroll_offset = rng.normal(0, 0.3, n)
    test_offset = rng.normal(0, 0.3, n)
    spread = rng.uniform(0.05, 0.15, n)
    is_target = rng.random(n) < 0.5
    clean = np.where(is_target, 3.0, 0.0) + rng.normal(0, 0.5, n)
    raw = enroll_offset + test_offset + spread * clean
    # Both sides' top cohort scores show the trial's offset and spread.
    offset = enroll_offset + test_offset
    normalised = asnorm(raw, offset, spread, offset, spread)
    np.testing.assert_allclose(normalised, clean, atol=1e-9)

    def errors(scores):
        cut = np.median(scores)
        return np.mean((scores >= cut) != is_target)

    assert errors(raw) > 0.25
    assert errors(normalised) < 0.05


def test_top_k_stats_ignores_excluded_entries_and_short_rows():
    scores = np.array([[0.9, 0.1, 0.8, 0.7], [0.5, 0.4, 0.3, 0.2]])
    exclude = np.array([[True, False, False, False], [False, True, True, True]])
    mean, std = top_k_stats(scores, 2, exclude)
    assert mean.tolist() == pytest.approx([0.75, 0.5])
    assert std[0] == pytest.approx(0.05)
    assert std[1] == pytest.approx(1e-3)  # one usable score: the floor, never zero


def test_fit_llr_recovers_the_true_llr_of_two_gaussians():
    """For N(mu1, s) vs N(mu0, s) the LLR is linear in the score with known slope and offset."""
    rng = np.random.default_rng(3)
    mu0, mu1, s = 0.2, 0.7, 0.1
    target = rng.normal(mu1, s, 20_000)
    nontarget = rng.normal(mu0, s, 200_000)  # the class sizes must not matter
    slope, offset = fit_llr(target, nontarget)
    assert slope == pytest.approx((mu1 - mu0) / s**2, rel=0.03)
    assert offset == pytest.approx((mu0**2 - mu1**2) / (2 * s**2), rel=0.03)
    llr_t, llr_n = slope * target + offset, slope * nontarget + offset
    assert cllr(llr_t, llr_n) < cllr(np.zeros(10), np.zeros(10)) == pytest.approx(1.0)


@pytest.mark.parametrize("far", [0.001, 0.01, 0.05])
def test_threshold_hits_the_requested_false_accept_rate_on_held_out_scores(far):
    rng = np.random.default_rng(4)
    fitting, held_out = rng.normal(0, 1, 200_000), rng.normal(0, 1, 200_000)
    cut = threshold_at_far(fitting, far)
    assert np.mean(fitting >= cut) <= far
    assert np.mean(held_out >= cut) == pytest.approx(far, rel=0.15)


def test_threshold_at_far_steps_over_ties():
    scores = np.array([0.0] * 10 + [1.0] * 10)
    cut = threshold_at_far(scores, 0.3)  # 6 may pass, but 10 sit at 1.0
    assert np.mean(scores >= cut) == 0.0


def test_bayes_threshold_follows_the_costs():
    assert bayes_threshold(0.5) == pytest.approx(0.0)
    assert bayes_threshold(0.01) == pytest.approx(np.log(99))
    assert bayes_threshold(0.01, c_miss=10) == pytest.approx(np.log(9.9))


def _clusters(rng, speakers=30, per=8, dim=16, noise=0.35):
    centres = rng.standard_normal((speakers, dim))
    rows = np.repeat(np.arange(speakers), per)
    vectors = centres[rows] + noise * rng.standard_normal((len(rows), dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.arange(1, len(rows) + 1), [f"spk{r:02d}" for r in rows], vectors


def test_leave_one_out_trials_never_score_a_probe_against_itself():
    rng = np.random.default_rng(5)
    ids, speakers, vectors = _clusters(rng, speakers=4, per=3, noise=0.0)  # identical utterances per speaker
    trials = leave_one_out_trials(ids, speakers, vectors, None, probes_per_speaker=3)
    # Without leave-one-out a probe would equal its centroid exactly; it still does here
    # because all of a speaker's utterances are the same vector, so check the counts too.
    assert trials.target["cosine"].size == 12
    assert trials.nontarget["cosine"].size == 12 * 3
    ids, speakers, vectors = _clusters(rng, speakers=4, per=3, noise=1.0)
    trials = leave_one_out_trials(ids, speakers, vectors, None, probes_per_speaker=3)
    assert trials.target["cosine"].max() < 0.999


def test_calibration_from_clusters_gives_llrs_and_thresholds_that_hold_on_new_speakers():
    rng = np.random.default_rng(6)
    settings = {
        "verify_far": 0.05, "identify_far": 0.05, "consistency_hold_rate": 0.02,
        "decision": "far", "p_target": 0.01, "c_miss": 1.0, "c_fa": 1.0,
    }
    ids, speakers, vectors = _clusters(rng, speakers=60)
    cohort = Cohort(ids, speakers, vectors, top_k=20)
    calibration = fit_calibration(1, leave_one_out_trials(ids, speakers, vectors, cohort), settings)
    assert set(calibration.thresholds) == {"cosine", "asnorm", "asnorm+calibrated"}
    assert calibration.slope > 0
    assert calibration.fit["asnorm+calibrated"]["cllr"] < 0.5

    # New speakers, scored as the engine does: held-out trials of the same kind.
    new_ids, new_speakers, new_vectors = _clusters(np.random.default_rng(7), speakers=40)
    held = leave_one_out_trials(new_ids + 10_000, new_speakers, new_vectors, cohort)
    for backend in ("cosine", "asnorm"):
        actual = np.mean(held.nontarget[backend] >= calibration.thresholds[backend]["verify"])
        assert 0.025 <= actual <= 0.10, (backend, actual)

    cost = fit_calibration(1, leave_one_out_trials(ids, speakers, vectors, cohort), {**settings, "decision": "cost"})
    assert cost.thresholds["asnorm+calibrated"]["verify"] == pytest.approx(np.log(99))


def test_index_ranks_by_cosine_and_reports_every_scale():
    rng = np.random.default_rng(8)
    ids, speakers, vectors = _clusters(rng, speakers=20)
    cohort = Cohort(ids, speakers, vectors, top_k=10)
    names = sorted(set(speakers))
    centroids = np.stack([vectors[np.array(speakers) == n].mean(axis=0) for n in names])
    settings = {"verify_far": 0.05, "identify_far": 0.05, "decision": "far", "p_target": 0.01, "c_miss": 1.0, "c_fa": 1.0}
    calibration = fit_calibration(1, leave_one_out_trials(ids, speakers, vectors, cohort), settings)
    index = CentroidIndex(names, centroids, cohort=cohort, calibration=calibration)
    probe = vectors[speakers.index("spk03")]
    hits = index.search(probe, 3)
    assert hits[0].speaker == "spk03"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert hits[0].llr == pytest.approx(calibration.slope * hits[0].normalised + calibration.offset)
    raw, normalised, llr = index.scores(probe)
    assert raw.max() == pytest.approx(hits[0].score) and llr.shape == normalised.shape == (20,)
    plain = CentroidIndex(names, centroids).search(probe, 3)  # no cohort: cosine only
    assert plain[0].normalised is None and plain[0].llr is None


def test_cached_profile_statistics_follow_changed_profiles():
    from engine.recognition import VersionScoring

    rng = np.random.default_rng(9)
    ids, speakers, vectors = _clusters(rng, speakers=12)
    cohort = Cohort(ids, speakers, vectors, top_k=10)
    state = VersionScoring(cohort, None, None)
    names = [f"p{i}" for i in range(6)]
    profiles = rng.standard_normal((6, 16)).astype(np.float32)
    first = state.enrollment_stats(names, profiles)
    moved = profiles.copy()
    moved[2] += 1.0  # one profile changed: only its statistics may change
    second = state.enrollment_stats(names, moved)
    expected = cohort.enrollment_stats(names, moved)
    # float32 scores of one row and of all six are summed in different BLAS blocks, which
    # can differ in the 7th digit; a stale cache would differ in the 1st or 2nd.
    np.testing.assert_allclose(second[0], expected[0], rtol=1e-6)
    np.testing.assert_allclose(second[1], expected[1], rtol=1e-6)
    assert np.array_equal(np.delete(first[0], 2), np.delete(second[0], 2))
    grown = state.enrollment_stats(names + ["p6"], np.vstack([moved, profiles[:1]]))  # a new speaker
    np.testing.assert_allclose(grown[0], cohort.enrollment_stats(names + ["p6"], np.vstack([moved, profiles[:1]]))[0], rtol=1e-6)
