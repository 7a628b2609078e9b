"""Paired statistics for two models scored on the same items: is a delta an effect or noise?

An item is an independent unit: one question, or (MMLU's prompt variants in the OLMo in-loop
suite) the cluster of one question's variants. Per task, item i holds ``sizes[i]`` scored
instances (1 unless clustered) and ``diffs[i]`` = (instances the model got right) - (instances
the baseline got right), in [-sizes[i], sizes[i]]. A task's delta is ``diffs.sum() / sizes.sum()``,
exactly the difference of the scores the result files report; the average's delta is the mean of
the tasks' deltas, as the table's average column is the mean of the task columns.

- ``bootstrap_ci``: a paired bootstrap over items (stratified by task for several tasks),
  percentile interval, seeded.
- ``mcnemar_exact_p``: the two-sided exact McNemar test on discordant pairs (binary items).
- ``sign_flip_p``: a paired sign-flip permutation test (clustered items, and the average).
- ``smallest_detectable_difference``: the delta a two-sided 5% test detects with 80% power at
  this sample size, for independent errors of the two models (an upper bound when their
  errors are positively correlated, as two checkpoints' usually are).
"""

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "ALPHA",
    "RESAMPLES",
    "SEED",
    "PairedTask",
    "bootstrap_ci",
    "mcnemar_exact_p",
    "sign_flip_p",
    "smallest_detectable_difference",
    "paired_test",
]

ALPHA = 0.05
RESAMPLES = 10_000
SEED = 0
_Z_TWO_SIDED_95 = 1.959963984540054
_Z_POWER_80 = 0.8416212335729143
_CHUNK_CELLS = 4_000_000  # resamples x items drawn at once (32 MB of int64 indices)


@dataclass(frozen=True)
class PairedTask:
    """One task's paired outcomes: ``diffs`` (items,) float64 and ``sizes`` (items,) float64 > 0."""

    diffs: np.ndarray
    sizes: np.ndarray

    @property
    def delta(self) -> float:
        """Model score minus baseline score, as a fraction."""
        return float(self.diffs.sum() / self.sizes.sum())

    @property
    def binary(self) -> bool:
        """Every item is one instance scored once per model: each diff is -1, 0 or 1 (McNemar applies)."""
        return bool(np.all(self.sizes == 1) and np.all(self.diffs == np.round(self.diffs)))


def _resampled(tasks: list[PairedTask], resamples: int, seed: int, draw) -> np.ndarray:
    """(resamples,) float64: the mean over tasks of sum(draw(...)) / sum(sizes) per resample."""
    rng = np.random.default_rng(seed)
    totals = np.zeros(resamples)
    for task in tasks:
        items = len(task.diffs)
        chunk = max(1, _CHUNK_CELLS // max(items, 1))
        for start in range(0, resamples, chunk):
            count = min(chunk, resamples - start)
            totals[start : start + count] += draw(rng, task, count)
    return totals / len(tasks)


def bootstrap_ci(tasks: list[PairedTask], resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """95% percentile interval of the (task-averaged) delta, resampling items within each task."""

    def draw(rng, task, count):
        index = rng.integers(0, len(task.diffs), size=(count, len(task.diffs)))
        return task.diffs[index].sum(axis=1) / task.sizes[index].sum(axis=1)

    low, high = np.quantile(_resampled(tasks, resamples, seed, draw), [ALPHA / 2, 1 - ALPHA / 2])
    return float(low), float(high)


def sign_flip_p(tasks: list[PairedTask], resamples: int = RESAMPLES, seed: int = SEED) -> float:
    """Two-sided p-value of the (task-averaged) delta under random sign flips of item differences.

    p = (1 + resamples at least as extreme) / (1 + resamples); 1.0 when every difference is 0.
    """
    observed = abs(sum(task.delta for task in tasks) / len(tasks))

    def draw(rng, task, count):
        signs = rng.integers(0, 2, size=(count, len(task.diffs))) * 2 - 1
        return (signs * task.diffs).sum(axis=1) / task.sizes.sum()

    flipped = np.abs(_resampled(tasks, resamples, seed, draw))
    extreme = int((flipped >= observed - 1e-12).sum())
    return (1 + extreme) / (1 + resamples)


def mcnemar_exact_p(model_only: int, baseline_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (binomial, p = 1/2)."""
    discordant = model_only + baseline_only
    if discordant == 0:
        return 1.0
    smaller = min(model_only, baseline_only)
    log_terms = [
        math.lgamma(discordant + 1) - math.lgamma(i + 1) - math.lgamma(discordant - i + 1) - discordant * math.log(2)
        for i in range(smaller + 1)
    ]
    top = max(log_terms)
    tail = math.exp(top) * sum(math.exp(term - top) for term in log_terms)
    return min(1.0, 2 * tail)


def smallest_detectable_difference(scores: list[float], items: list[int]) -> float:
    """Fraction: the delta of the task average detectable at 5% (two-sided) with 80% power.

    ``scores``: each task's baseline score (fraction); ``items``: each task's independent items.
    Per task the variance of a delta is taken as 2 p (1 - p) / n, p(1 - p) at least 1/n.
    """
    variance = sum(2 * max(p * (1 - p), 1 / n) / n for p, n in zip(scores, items)) / len(scores) ** 2
    return (_Z_TWO_SIDED_95 + _Z_POWER_80) * math.sqrt(variance)


def paired_test(tasks: list[PairedTask], resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Delta, 95% bootstrap interval, p-value and the test used, for one task or an average.

    One binary task: exact McNemar. A clustered task, or several tasks (the average, stratified
    by task): the sign-flip permutation test.
    """
    low, high = bootstrap_ci(tasks, resamples, seed)
    if len(tasks) == 1 and tasks[0].binary:
        diffs = tasks[0].diffs
        p_value, test = mcnemar_exact_p(int((diffs > 0).sum()), int((diffs < 0).sum())), "exact McNemar"
    else:
        p_value, test = sign_flip_p(tasks, resamples, seed), "paired sign-flip permutation"
    return {
        "delta": sum(task.delta for task in tasks) / len(tasks),
        "ci95_low": low,
        "ci95_high": high,
        "p_value": p_value,
        "n": int(sum(len(task.diffs) for task in tasks)),
        "test": test,
    }
