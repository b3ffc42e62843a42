"""Cosine and AS-norm on synthetic scores whose answers are known (calibration and
thresholds: tests/test_calibration.py)."""

from __future__ import annotations

import numpy as np
import pytest

from voiceprint.engine.scoring import Cohort, asnorm, top_k_stats


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
