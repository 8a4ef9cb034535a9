"""Base vs fine-tuned: per-model figures on the same items, the difference, and its 95% CI.

Pass rates get a Wilson interval (well-behaved at 0% and 100%); a difference between two runs on
the same items gets a paired percentile bootstrap (items resampled together, so both models
see the same resample), macro-F1 likewise. Percentile, not BCa: BCa returns NaN when every item
passes or fails in both runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
SEED = 0


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


def wilson(passed: int, total: int) -> Interval:
    from scipy.stats import binomtest

    if total == 0:
        return Interval(float("nan"), float("nan"))
    ci = binomtest(passed, total).proportion_ci(confidence_level=0.95, method="wilson")
    return Interval(float(ci.low), float(ci.high))


def paired_bootstrap(
    a: Sequence, b: Sequence, statistic: Callable[[np.ndarray], float], *, resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, Interval]:
    """``statistic(b) - statistic(a)`` and its 95% percentile interval; ``a[i]`` and ``b[i]`` are
    the same item. ``statistic`` takes an array of indexes into the items."""
    n = len(a)
    if n == 0 or len(b) != n:
        raise ValueError("both runs need the same, non-empty items")
    rng = np.random.default_rng(seed)
    every = np.arange(n)
    observed = float(statistic(every))
    draws = np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)])
    low, high = np.percentile(draws, [2.5, 97.5])
    return observed, Interval(float(low), float(high))


def pass_rate_diff(a: Sequence[bool], b: Sequence[bool], **kw) -> tuple[float, Interval]:
    """Difference of pass rates (b - a) on the same items, paired bootstrap 95% CI."""
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return paired_bootstrap(a, b, lambda idx: xb[idx].mean() - xa[idx].mean(), **kw)


def macro_f1_diff(
    truths: Sequence[str], pred_a: Sequence[str], pred_b: Sequence[str], labels: list[str], **kw
) -> tuple[float, Interval]:
    """Difference of macro-F1 (b - a) over ``labels`` on the same items, paired bootstrap 95% CI."""
    from sklearn.metrics import f1_score

    t, pa, pb = np.asarray(truths, dtype=object), np.asarray(pred_a, dtype=object), np.asarray(pred_b, dtype=object)

    def f1(pred: np.ndarray, idx: np.ndarray) -> float:
        return float(f1_score(t[idx], pred[idx], labels=labels, average="macro", zero_division=0))

    return paired_bootstrap(pred_a, pred_b, lambda idx: f1(pb, idx) - f1(pa, idx), **kw)
