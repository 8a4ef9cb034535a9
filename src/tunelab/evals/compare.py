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


@dataclass(frozen=True)
class Row:
    """One line of a side-by-side table: a metric per model, and each model's difference from the first."""

    metric: str
    values: list[float]
    intervals: Sequence[Interval | None]  # a 95% interval per model (Wilson for pass rates)
    diffs: Sequence[tuple[float, Interval] | None]  # vs the first model; None for the first


def side_by_side(criteria: list[dict], outputs: list[list[dict]]) -> list[Row]:
    """Pass rate per criterion (and accuracy/macro-F1 for a classification criterion) per run.

    Args:
        criteria: the eval's testing criteria, as echoed.
        outputs: per run, its output items as the API returns them (``datasource_item_id``,
            ``results``); runs are paired on the items they all graded.
    """
    from tunelab.evals.report import OFF_FORMAT, classification_criterion

    by_item = [{o["datasource_item_id"]: o for o in run} for run in outputs]
    common = sorted(set.intersection(*(set(m) for m in by_item))) if by_item else []
    rows = []

    def result(run: int, item: int, criterion_id: str) -> dict:
        return next(r for r in by_item[run][item]["results"] if r["name"] == criterion_id)

    for c in criteria:
        passed = [[bool(result(k, i, c["id"])["passed"]) for i in common] for k in range(len(outputs))]
        rows.append(
            Row(
                metric=f"{c['name']} pass rate",
                values=[sum(p) / len(p) if p else float("nan") for p in passed],
                intervals=[wilson(sum(p), len(p)) for p in passed],
                diffs=[None, *(pass_rate_diff(passed[0], p) if common else None for p in passed[1:])],
            )
        )
    found = classification_criterion(criteria)
    if found is not None and common:
        c, _ = found
        truths = [str(result(0, i, c["id"]).get("reference", "")) for i in common]
        preds = [[str(result(k, i, c["id"]).get("input", "")) for i in common] for k in range(len(outputs))]
        labels = sorted(set(truths))
        from sklearn.metrics import f1_score

        f1s = [float(f1_score(truths, p, labels=labels, average="macro", zero_division=0)) for p in preds]
        rows.append(
            Row(
                metric="macro-F1",
                values=f1s,
                intervals=[None] * len(outputs),
                diffs=[None, *(macro_f1_diff(truths, preds[0], p, labels) for p in preds[1:])],
            )
        )
        off = [sum(1 for v in p if v not in labels) / len(p) for p in preds]
        rows.append(
            Row(
                metric=f"off-format ({OFF_FORMAT})",
                values=off,
                intervals=[None] * len(outputs),
                diffs=[None] * len(outputs),
            )
        )
    return rows
