"""Summaries of per-example token counts, and the planned number of epochs.

``auto_n_epochs`` is the one implementation of the default-epochs rule; the trainer imports it.
"""

from __future__ import annotations

import numpy as np

from tunelab.data.report import Distribution, Histogram

# The OpenAI cookbook's default-epochs rule ("Data preparation and analysis for chat model
# fine-tuning"): aim at 3 epochs, but see at least 100 and at most 25,000 examples in all.
TARGET_EPOCHS = 3
MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
MIN_DEFAULT_EPOCHS = 1
MAX_DEFAULT_EPOCHS = 25

HISTOGRAM_BINS = 10


def auto_n_epochs(n_examples: int) -> int:
    """Epochs to train for when the user asks for "auto", given the training examples.

    3 by default; more for small files so that about 100 examples are seen (at most 25), fewer
    for large files so that about 25,000 are seen (at least 1). An empty file gets the maximum,
    the limit of the rule as the file shrinks.
    """
    if n_examples <= 0:
        return MAX_DEFAULT_EPOCHS
    if n_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_DEFAULT_EPOCHS, MIN_TARGET_EXAMPLES // n_examples)
    if n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_DEFAULT_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return TARGET_EPOCHS


def distribution(values: np.ndarray) -> Distribution:
    """min, max, mean, median, p5 and p95 of a non-empty array of counts."""
    p5, median, p95 = np.percentile(values, [5, 50, 95])
    return Distribution(
        min=int(values.min()),
        max=int(values.max()),
        mean=float(values.mean()),
        median=float(median),
        p5=float(p5),
        p95=float(p95),
    )


def histogram(values: np.ndarray, bins: int = HISTOGRAM_BINS) -> Histogram:
    """Equal-width bins with integer edges over [min, max] of a non-empty array of counts."""
    low, high = int(values.min()), int(values.max())
    edges = np.unique(np.linspace(low, high + 1, bins + 1).round().astype(np.int64))
    counts, _ = np.histogram(values, bins=edges)
    return Histogram(edges=[int(e) for e in edges], counts=[int(c) for c in counts])
