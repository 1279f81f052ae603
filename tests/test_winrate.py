"""Win-rate statistics on known cases: worked Wilson example, fair coin, all wins, and judges
biased towards longer answers, whose length-corrected win rate is about 0.5."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sami_worker.winrate import compute_win_rate, length_corrected_rate, wilson_interval


def test_wilson_interval_worked_example():
    # 8 wins in 10, z = 1.96: centre (p + z^2/2n) / (1 + z^2/n) = 0.99208 / 1.38415 = 0.71674,
    # half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n) = 1.96 * 0.160012 / 1.38415 = 0.22658.
    interval = wilson_interval(8, 10)
    assert interval.value == 0.8
    assert interval.low == pytest.approx(0.71674 - 0.22658, abs=1e-4)
    assert interval.high == pytest.approx(0.71674 + 0.22658, abs=1e-4)


def test_ties_count_half_a_win():
    estimate = compute_win_rate([1, 0.5, 0.5, 0, 1, 0.5], [5, 6, 7, 8, 9, 10], [7] * 6)
    assert estimate.raw.value == pytest.approx(3.5 / 6)
    assert estimate.raw.low == pytest.approx(wilson_interval(3.5, 6).low)


def lengths(rng, n, mean_diff):
    base = rng.integers(50, 250, n).astype(float)
    test = base + rng.normal(mean_diff, 60, n).round()
    return test, base


def test_fair_coin_gives_one_half_with_covering_intervals():
    rng = np.random.default_rng(1)
    test, base = lengths(rng, 400, 0)
    outcomes = rng.integers(0, 2, 400).astype(float).tolist()
    estimate = compute_win_rate(outcomes, test, base)
    assert abs(estimate.raw.value - 0.5) < 0.06
    assert estimate.raw.low < 0.5 < estimate.raw.high
    assert estimate.length_corrected.low < 0.5 < estimate.length_corrected.high
    # A half-width of about 1.96 * sqrt(0.25 / 400) = 0.049.
    assert estimate.raw.high - estimate.raw.low == pytest.approx(0.098, abs=0.004)


def test_all_wins_give_an_interval_near_one():
    rng = np.random.default_rng(2)
    test, base = lengths(rng, 50, 0)
    estimate = compute_win_rate([1.0] * 50, test, base)
    assert estimate.raw.value == estimate.raw.high == 1.0
    assert estimate.raw.low > 0.92  # Wilson: n / (n + z^2) = 50 / 53.84
    # Every verdict is the same: nothing for length to explain.
    assert estimate.length_corrected == estimate.raw


def test_length_biased_judge_is_corrected_to_about_one_half():
    """The judge has no preference at equal length and prefers the longer answer ever more
    strongly as the difference grows; the tested model writes longer answers."""
    rng = np.random.default_rng(3)
    test, base = lengths(rng, 400, 60)
    z = (test - base) / (test - base).std(ddof=1)
    outcomes = (rng.random(400) < 1 / (1 + np.exp(-3 * z))).astype(float).tolist()
    estimate = compute_win_rate(outcomes, test, base)
    assert estimate.raw.value > 0.7 and estimate.raw.low > 0.6
    corrected = estimate.length_corrected
    assert abs(corrected.value - 0.5) < 0.08
    assert corrected.low < 0.5 < corrected.high


def test_judge_always_preferring_the_longer_answer():
    """Perfect separation: the maximum-likelihood slope is infinite; the log-F(1,1) prior keeps
    the fit finite, and the corrected rate, though poorly determined (at equal length this
    judge has no answer), is about 0.5 and well below the raw rate."""
    rng = np.random.default_rng(4)
    test, base = lengths(rng, 250, 60)
    outcomes = [1.0 if t > b else 0.0 if t < b else 0.5 for t, b in zip(test, base, strict=True)]
    estimate = compute_win_rate(outcomes, test, base)
    assert estimate.raw.value > 0.75 and estimate.raw.low > 0.7
    corrected = estimate.length_corrected
    assert corrected.low < 0.5 < corrected.high
    assert abs(corrected.value - 0.5) < 0.15
    assert corrected.value < estimate.raw.low


def test_length_neutral_preference_survives_the_correction():
    """A judge that prefers the tested model 70% of the time whatever the lengths: the rate at
    equal length (z = 0, about one sd below the mean difference here, so a wider interval) is
    about the raw rate and still clearly above 0.5."""
    rng = np.random.default_rng(5)
    test, base = lengths(rng, 400, 60)
    outcomes = (rng.random(400) < 0.7).astype(float).tolist()
    estimate = compute_win_rate(outcomes, test, base)
    assert estimate.length_corrected.value == pytest.approx(estimate.raw.value, abs=0.05)
    assert estimate.length_corrected.low > 0.5


def test_fractional_outcomes_fit_like_split_ties():
    """A tie as one row with outcome 0.5 has the same score equations as half a win plus half
    a loss (two rows weighted 0.5): same estimate."""
    import statsmodels.api as sm

    rng = np.random.default_rng(6)
    n = 60
    diffs = rng.normal(20, 50, n)
    outcomes = rng.choice([0.0, 0.5, 1.0], n).tolist()
    ours = length_corrected_rate(outcomes, diffs)

    z = diffs / diffs.std(ddof=1)
    rows, ys, weights = [], [], []
    for y, zi in zip(outcomes, z, strict=True):
        for value, weight in ((1.0, y), (0.0, 1 - y)):
            if weight:
                rows.append([1.0, zi])
                ys.append(value)
                weights.append(weight)
    rows.append([0.0, 1.0])  # the same log-F(1,1) prior row
    ys.append(0.5)
    weights.append(1.0)
    split = sm.GLM(np.array(ys), np.array(rows), family=sm.families.Binomial(), var_weights=weights)
    b0 = split.fit().params[0]
    assert ours.value == pytest.approx(1 / (1 + math.exp(-b0)), abs=1e-6)


def test_equal_lengths_need_no_correction_and_constant_differences_cannot_be_corrected():
    outcomes = [1.0, 0.0, 1.0, 0.5]
    same = compute_win_rate(outcomes, [10] * 4, [10] * 4)
    assert same.length_corrected == same.raw
    shifted = compute_win_rate(outcomes, [12] * 4, [10] * 4)
    assert shifted.length_corrected is None
    assert shifted.raw.value == pytest.approx(0.625)


@pytest.mark.parametrize(
    "outcomes, test, base, message",
    [
        ([], [], [], "no judged items"),
        ([1.0], [1, 2], [1], "one length per item"),
        ([1.5], [1], [1], r"\[0, 1\]"),
    ],
)
def test_bad_inputs_are_named(outcomes, test, base, message):
    with pytest.raises(ValueError, match=message):
        compute_win_rate(outcomes, test, base)
