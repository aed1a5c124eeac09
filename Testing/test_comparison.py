"""Paired comparison of two methods: Wilcoxon signed-rank test, bootstrap interval, averaging repeats."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from cmedl.comparison import mean_by, paired_comparison

# Differences a - b = [0.10, -0.05, 0.20, 0.15, 0.30, 0.02]: distinct magnitudes, so no tied ranks.
A = [0.5, 0.6, 0.7, 0.8, 0.9, 0.55]
B = [0.4, 0.65, 0.5, 0.65, 0.6, 0.53]


def exact_two_sided_wilcoxon_p(statistic: float, n: int) -> float:
    """P(W <= statistic) under H0 (each rank's sign is + or - with probability 1/2), doubled, by enumeration."""
    as_small = 0
    for signs in itertools.product((0, 1), repeat=n):
        negative_rank_sum = sum(rank for rank, negative in zip(range(1, n + 1), signs) if negative)
        as_small += negative_rank_sum <= statistic
    return min(1.0, 2 * as_small / 2**n)


def test_hand_computed_case() -> None:
    result = paired_comparison(A, B)
    assert result["n"] == 6 and result["dropped"] == 0
    assert result["mean_a"] == pytest.approx(4.05 / 6)
    assert result["mean_b"] == pytest.approx(3.33 / 6)
    assert result["mean_difference"] == pytest.approx(0.72 / 6)  # 0.12
    assert result["median_difference"] == pytest.approx((0.10 + 0.15) / 2)
    assert (result["a_better"], result["b_better"], result["ties"]) == (5, 1, 0)
    # |d| ranked: 0.02 -> 1, 0.05 -> 2, 0.10 -> 3, 0.15 -> 4, 0.20 -> 5, 0.30 -> 6. The one negative
    # difference has rank 2, so W- = 2 and W+ = 19; W is the smaller sum.
    assert result["wilcoxon_statistic"] == 2
    # Of the 2^6 = 64 equally likely sign assignments, 3 have a negative rank sum <= 2 ({}, {1}, {2}):
    # two-sided p = 2 * 3 / 64.
    assert exact_two_sided_wilcoxon_p(2, 6) == pytest.approx(6 / 64)
    assert result["wilcoxon_p"] == pytest.approx(6 / 64)
    assert result["note"] is None
    assert (result["confidence"], result["n_bootstrap"]) == (0.95, 10000)
    assert all(type(result[key]) is float for key in ("mean_difference", "wilcoxon_p", "ci_low", "ci_high"))


def test_the_bootstrap_interval_holds_the_mean_is_reproducible_and_narrows_with_more_pairs() -> None:
    result = paired_comparison(A, B, n_bootstrap=2000, seed=3)
    assert result["ci_low"] < result["mean_difference"] < result["ci_high"]
    # resampled means lie between the smallest and the largest difference
    assert -0.05 - 1e-12 <= result["ci_low"] and result["ci_high"] <= 0.30 + 1e-12
    again = paired_comparison(A, B, n_bootstrap=2000, seed=3)
    assert (again["ci_low"], again["ci_high"]) == (result["ci_low"], result["ci_high"])
    other_seed = paired_comparison(A, B, n_bootstrap=2000, seed=4)
    assert (other_seed["ci_low"], other_seed["ci_high"]) != (result["ci_low"], result["ci_high"])

    rng = np.random.default_rng(0)
    b = rng.uniform(0.5, 0.8, size=200)
    a = b + rng.normal(0.02, 0.05, size=200)
    few = paired_comparison(a[:10], b[:10], n_bootstrap=2000)
    many = paired_comparison(a, b, n_bootstrap=2000)
    assert many["ci_high"] - many["ci_low"] < few["ci_high"] - few["ci_low"]


def test_a_wider_confidence_gives_a_wider_interval() -> None:
    narrow = paired_comparison(A, B, n_bootstrap=2000, confidence=0.8)
    wide = paired_comparison(A, B, n_bootstrap=2000, confidence=0.99)
    assert wide["ci_low"] < narrow["ci_low"] and narrow["ci_high"] < wide["ci_high"]


def test_pairs_with_a_nan_are_dropped() -> None:
    result = paired_comparison(A + [math.nan, 0.7], B + [0.6, math.nan])
    assert result["n"] == 6 and result["dropped"] == 2
    assert result["mean_difference"] == pytest.approx(0.12)
    assert result["wilcoxon_p"] == pytest.approx(6 / 64)


def test_all_zero_differences_give_p_one_with_a_note() -> None:
    result = paired_comparison([0.7, 0.8, 0.9], [0.7, 0.8, 0.9])
    assert result["wilcoxon_p"] == 1.0 and result["wilcoxon_statistic"] is None
    assert "zero" in result["note"]
    assert (result["a_better"], result["b_better"], result["ties"]) == (0, 0, 3)
    assert result["ci_low"] == result["ci_high"] == 0.0


def test_no_pairs_left_gives_p_one_with_a_note() -> None:
    result = paired_comparison([math.nan], [0.5])
    assert result["n"] == 0 and result["dropped"] == 1
    assert result["wilcoxon_p"] == 1.0 and result["wilcoxon_statistic"] is None and result["note"]
    assert math.isnan(result["mean_difference"]) and math.isnan(result["ci_low"])


def test_unequal_lengths_and_bad_settings_raise() -> None:
    with pytest.raises(ValueError, match="same length"):
        paired_comparison([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="confidence"):
        paired_comparison(A, B, confidence=95)
    with pytest.raises(ValueError, match="n_bootstrap"):
        paired_comparison(A, B, n_bootstrap=0)


def test_mean_by_averages_each_group_and_skips_nan() -> None:
    rows = [
        {"method": "cmedl", "case": "c1", "seed": 0, "dice": 0.6},
        {"method": "cmedl", "case": "c1", "seed": 1, "dice": 0.8},
        {"method": "cmedl", "case": "c1", "seed": 2, "dice": math.nan},
        {"method": "cmedl", "case": "c2", "seed": 0, "dice": 0.5},
        {"method": "ct_only", "case": "c1", "seed": 0, "dice": 0.4},
        {"method": "ct_only", "case": "c2", "seed": 0, "dice": math.nan},
    ]
    means = mean_by(rows, ("method", "case"), "dice")
    assert list(means) == [("cmedl", "c1"), ("cmedl", "c2"), ("ct_only", "c1"), ("ct_only", "c2")]
    assert means[("cmedl", "c1")] == pytest.approx(0.7)
    assert means[("cmedl", "c2")] == 0.5 and means[("ct_only", "c1")] == 0.4
    assert math.isnan(means[("ct_only", "c2")])
