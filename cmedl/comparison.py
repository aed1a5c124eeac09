"""Paired comparison of two methods scored on the same cases.

Two segmentation methods scored on the same test cases give paired scores (Dice of CMEDL and of CT only on
each case). Pairing removes the case-to-case variation that dominates such scores, so the question "is A
better than B here?" is asked of the per-case differences ``d = a - b``:

* a two-sided Wilcoxon signed-rank test (no assumption that ``d`` is normally distributed), and
* a percentile bootstrap confidence interval of the mean difference (how large the effect is, in score units).

A p value alone says nothing of the size of a difference, and a confidence interval that spans 0 means that no
difference was shown (which is not the same as showing that there is none).

:func:`mean_by` averages repeated scores (several training seeds) per case before such a test, since the test
assumes one pair per case.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats


def paired_comparison(
    a: Sequence[float],
    b: Sequence[float],
    *,
    n_bootstrap: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare paired scores ``a`` (method A) and ``b`` (method B) of the same cases in the same order.

    Pairs where either score is NaN are dropped. Returns a dict of plain Python values:

    ``n`` pairs used, ``dropped`` pairs with a NaN, ``mean_a``, ``mean_b``, ``mean_difference`` and
    ``median_difference`` of ``a - b``, ``a_better`` / ``b_better`` / ``ties`` (exact equality) case counts,
    ``wilcoxon_statistic`` and ``wilcoxon_p`` (two-sided signed-rank test), ``ci_low`` / ``ci_high`` (percentile
    bootstrap interval of the mean difference), ``confidence``, ``n_bootstrap`` and ``note`` (why the test could
    not be run, else None).

    Raises:
        ValueError: ``a`` and ``b`` differ in length, or ``confidence`` / ``n_bootstrap`` is out of range.
    """
    if len(a) != len(b):
        raise ValueError(f"paired scores must have the same length, got {len(a)} and {len(b)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    if n_bootstrap < 1:
        raise ValueError(f"n_bootstrap must be at least 1, got {n_bootstrap}")

    a_values = np.asarray(a, dtype=float)
    b_values = np.asarray(b, dtype=float)
    keep = ~(np.isnan(a_values) | np.isnan(b_values))
    a_values, b_values = a_values[keep], b_values[keep]
    differences = a_values - b_values
    n = int(differences.size)

    result: dict[str, Any] = {
        "n": n,
        "dropped": int(keep.size - n),
        "mean_a": _mean(a_values),
        "mean_b": _mean(b_values),
        "mean_difference": _mean(differences),
        "median_difference": float(np.median(differences)) if n else math.nan,
        "a_better": int(np.count_nonzero(differences > 0)),
        "b_better": int(np.count_nonzero(differences < 0)),
        "ties": int(np.count_nonzero(differences == 0)),
        "wilcoxon_statistic": None,
        "wilcoxon_p": 1.0,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "confidence": float(confidence),
        "n_bootstrap": int(n_bootstrap),
        "note": None,
    }

    # scipy refuses (or returns NaN for) an empty sample or one without a single non-zero difference; neither
    # holds any evidence of a difference, so report p = 1 and say why.
    if n < 1:
        result["note"] = "no pairs without NaN: nothing to test"
    elif not np.any(differences):
        result["note"] = "all differences are zero: the methods scored the same on every case"
    else:
        test = stats.wilcoxon(differences)
        result["wilcoxon_statistic"] = float(test.statistic)
        result["wilcoxon_p"] = float(test.pvalue)

    if n:
        result["ci_low"], result["ci_high"] = _bootstrap_mean_interval(differences, n_bootstrap, confidence, seed)
    return result


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if values.size else math.nan


def _bootstrap_mean_interval(
    differences: np.ndarray, n_bootstrap: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile interval of the mean over ``n_bootstrap`` resamples (with replacement) of the pairs."""
    rng = np.random.default_rng(seed)
    # one row of case indices per resample, drawn at once; the rows' means are the bootstrap distribution
    indices = rng.integers(0, differences.size, size=(n_bootstrap, differences.size))
    means = differences[indices].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def mean_by(rows: Iterable[Mapping[str, Any]], group: Sequence[str], value: str) -> dict[tuple, float]:
    """Mean of ``row[value]`` over the rows that share the same values of the ``group`` fields.

    Keys are tuples of the group fields' values, in the order the groups first appear. NaN values are skipped; a
    group whose values are all NaN gets NaN. Used to average scores over training seeds per case.
    """
    sums: dict[tuple, float] = {}
    counts: dict[tuple, int] = {}
    for row in rows:
        key = tuple(row[name] for name in group)
        sums.setdefault(key, 0.0)
        counts.setdefault(key, 0)
        number = float(row[value])
        if not math.isnan(number):
            sums[key] += number
            counts[key] += 1
    return {key: sums[key] / counts[key] if counts[key] else math.nan for key in sums}
