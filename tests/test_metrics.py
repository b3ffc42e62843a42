"""Metrics against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from voiceprint.engine.metrics import d_prime, eer, error_rates, forgetting, min_dcf, top_k_accuracy


def test_eer_perfect_separation_is_zero():
    rate, threshold = eer([0.8, 0.9], [0.1, 0.2, 0.3])
    assert rate == 0.0 and 0.3 < threshold <= 0.8


def test_eer_identical_distributions_is_one_half():
    scores = np.linspace(0, 1, 101)
    rate, _ = eer(scores, scores)
    assert rate == pytest.approx(0.5, abs=0.01)


def test_eer_matches_a_brute_force_sweep():
    rng = np.random.default_rng(0)
    target, nontarget = rng.normal(1.0, 1.0, 300), rng.normal(-1.0, 1.0, 500)
    rate, threshold = eer(target, nontarget)
    # Brute force over the same thresholds with Python loops.
    best = min(
        (abs(np.mean(target < t) - np.mean(nontarget >= t)), (np.mean(target < t) + np.mean(nontarget >= t)) / 2)
        for t in np.unique(np.concatenate([target, nontarget]))
    )
    assert rate == pytest.approx(best[1])
    # Two unit-variance Gaussians 2 apart: EER = Phi(-1) = 0.1587.
    assert rate == pytest.approx(0.1587, abs=0.03)


def test_eer_needs_both_kinds():
    with pytest.raises(ValueError):
        eer([], [0.1])


def test_top_k():
    scores = np.array([[0.1, 0.5, 0.4], [0.3, 0.2, 0.1], [0.2, 0.3, 0.25]])
    truth = np.array([2, 0, 0])
    assert top_k_accuracy(scores, truth, k=1) == pytest.approx(1 / 3)
    assert top_k_accuracy(scores, truth, k=2) == pytest.approx(2 / 3)
    assert top_k_accuracy(scores, truth, k=3) == 1.0


def test_d_prime_by_hand():
    # means 3 and 1, sample variances 1 and 1 -> pooled sd 1 -> d' = 2
    assert d_prime([2.0, 3.0, 4.0], [0.0, 1.0, 2.0]) == pytest.approx(2.0)
    # it is symmetric in spread: variances 4 and 0 pool to sqrt(2)
    assert d_prime([1.0, 3.0, 5.0], [0.0, 0.0, 0.0]) == pytest.approx(3.0 / np.sqrt(2.0))
    assert d_prime([0.0, 1.0], [2.0, 3.0]) < 0  # targets below non-targets


def test_d_prime_needs_two_of_each():
    with pytest.raises(ValueError):
        d_prime([1.0], [0.0, 0.5])


def test_min_dcf_by_hand():
    target, nontarget = [0.9, 0.8, 0.7, 0.55], [0.6, 0.3, 0.2, 0.1]
    # p_target 0.5: threshold 0.7 misses one target (0.55); 0.55 accepts one non-target
    # (0.6). Either costs 0.25 * 0.5 = 0.125, normalised by 0.5 -> 0.25.
    cost, _ = min_dcf(target, nontarget, p_target=0.5)
    assert cost == pytest.approx(0.25)
    # p_target 0.01: a false alarm weighs 99 misses, so the best threshold accepts no
    # non-target: 0.6 is not enough (0.6 itself is accepted), 0.7 is: one miss (0.55)
    # costs 0.25 * 0.01 = 0.0025, normalised by 0.01 -> 0.25.
    cost, threshold = min_dcf(target, nontarget, p_target=0.01)
    assert cost == pytest.approx(0.25) and threshold == 0.7


def test_min_dcf_is_one_for_a_useless_system():
    scores = np.linspace(0, 1, 50)
    assert min_dcf(scores, scores, p_target=0.05)[0] == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError):
        min_dcf([1.0], [0.0], p_target=1.5)


def test_error_rates_are_monotonic():
    rng = np.random.default_rng(0)
    _, miss, fa = error_rates(rng.normal(1, 1, 300), rng.normal(0, 1, 3000))
    assert np.all(np.diff(miss) >= 0) and np.all(np.diff(fa) <= 0)


def test_forgetting_by_hand():
    nan = np.nan
    matrix = np.array([
        [0.90, nan, nan],
        [0.95, 0.80, nan],
        [0.85, 0.70, 0.60],
    ])
    out = forgetting(matrix)
    assert out["average_accuracy"] == pytest.approx((0.85 + 0.70 + 0.60) / 3, abs=1e-4)
    # task 1: best before the end 0.95, final 0.85 -> 0.10; task 2: 0.80 -> 0.70 -> 0.10
    assert out["forgetting"] == pytest.approx(0.10)
    # (0.85 - 0.90) and (0.70 - 0.80) -> mean -0.075
    assert out["backward_transfer"] == pytest.approx(-0.075)
    assert forgetting(np.array([[0.5]])) == {"average_accuracy": 0.5, "forgetting": 0.0, "backward_transfer": 0.0}
    with pytest.raises(ValueError):
        forgetting(np.zeros((2, 3)))
