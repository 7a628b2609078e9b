"""Statistics for "did GatePro make a difference?": checkpoints item by item, methods seed by seed.

Two questions, two units:

- **The method** (GatePro vs the baseline recipe): the unit is the training run. Each arm's
  seeds give one score per run; ``seed_level_test`` compares them with a t test, paired by
  seed where the arms share initial weights and data order (``scipy.stats.ttest_rel`` on the
  per-seed deltas), unpaired otherwise (Welch, ``scipy.stats.ttest_ind(equal_var=False)``).
  Below ``MIN_SEEDS`` seeds per arm, or with a seed spread of exactly 0, no claim is made.
- **Two checkpoints** on the same items: an item is the unit. Per task, item i holds
  ``sizes[i]`` scored instances (1 unless clustered: MMLU's prompt variants of one question in
  the OLMo in-loop suite) and ``diffs[i]`` = (model's instances right) - (baseline's right), or a
  continuous per-item difference (the margin of the correct choice). A task's delta is
  ``diffs.sum() / sizes.sum()``; an average's is the mean of its tasks' deltas. Binary items:
  the exact McNemar test (``scipy.stats.binomtest`` on the discordant pairs); otherwise a paired
  sign-flip permutation test. Intervals: a paired bootstrap over items, stratified by task.

``holm`` adjusts a family of p-values; ``detectable_difference`` and ``seeds_needed`` give the
power (80%) of the test actually run, from its observed standard error and degrees of freedom.
"""

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

__all__ = [
    "ALPHA",
    "POWER",
    "Z_CRITICAL",
    "MIN_SEEDS",
    "RESAMPLES",
    "SEED",
    "PairedTask",
    "bootstrap_ci",
    "mcnemar_exact_p",
    "sign_flip_p",
    "item_paired_test",
    "seed_level_test",
    "holm",
    "adjust_seed_level_tests",
    "detectable_difference",
    "seeds_needed",
]

ALPHA = 0.05
POWER = 0.8
Z_CRITICAL = float(stats.norm.ppf(1 - ALPHA / 2))  # the two-sided 5% normal quantile, 1.95996...
MIN_SEEDS = 3  # per arm, for a claim about the method
MAX_SEEDS = 10_000  # seeds_needed reports "more than this" beyond it
RESAMPLES = 10_000
SEED = 0
_CHUNK_CELLS = 4_000_000  # resamples x items drawn at once (32 MB of int64 indices)


@dataclass(frozen=True)
class PairedTask:
    """One task's paired outcomes: ``diffs`` (items,) float64 and ``sizes`` (items,) float64 > 0."""

    diffs: np.ndarray
    sizes: np.ndarray
    counts: bool = True  # diffs count instances right (accuracy); False: continuous scores (margins)

    @property
    def delta(self) -> float:
        """Model minus baseline, per instance (a fraction for accuracy)."""
        return float(self.diffs.sum() / self.sizes.sum())

    @property
    def binary(self) -> bool:
        """Every item is one instance scored once per model: each diff is -1, 0 or 1 (McNemar applies)."""
        return self.counts and bool(np.all(self.sizes == 1) and np.all(np.isin(self.diffs, (-1.0, 0.0, 1.0))))

    @property
    def variance(self) -> float:
        """Variance of ``delta`` over items: n s^2(diffs) / sizes.sum()^2.

        For counts s^2 is at least 1 / n (one discordant item in n): a pair that agrees on
        every item must not claim it could detect any difference at all.
        """
        items = len(self.diffs)
        spread = float(np.var(self.diffs, ddof=1)) if items > 1 else 0.0
        if self.counts:
            spread = max(spread, 1 / items)
        return items * spread / float(self.sizes.sum()) ** 2

    @staticmethod
    def pooled(tasks: list["PairedTask"]) -> "PairedTask":
        """Every item of ``tasks`` as one task (the item-pooled score)."""
        return PairedTask(np.concatenate([t.diffs for t in tasks]), np.concatenate([t.sizes for t in tasks]),
                          all(t.counts for t in tasks))


def _resampled(tasks: list[PairedTask], resamples: int, seed: int, draw) -> np.ndarray:
    """(resamples,) float64: the mean over tasks of draw(...) per resample."""
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
    scale = max(float(np.abs(task.diffs).max(initial=0.0)) for task in tasks)
    if scale == 0:
        return 1.0

    def draw(rng, task, count):
        signs = rng.integers(0, 2, size=(count, len(task.diffs))) * 2 - 1
        return (signs * task.diffs).sum(axis=1) / task.sizes.sum()

    flipped = np.abs(_resampled(tasks, resamples, seed, draw))
    extreme = int((flipped >= observed - 1e-12 * scale).sum())
    return (1 + extreme) / (1 + resamples)


def mcnemar_exact_p(model_only: int, baseline_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: a binomial test of p = 1/2."""
    discordant = model_only + baseline_only
    if discordant == 0:
        return 1.0
    return float(stats.binomtest(model_only, discordant, 0.5).pvalue)


def item_paired_test(tasks: list[PairedTask], resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """Two checkpoints on the same items: delta, 95% bootstrap interval, p-value, test, standard error.

    One binary task: exact McNemar. Clustered or continuous items, or several tasks (an average,
    stratified by task): the sign-flip permutation test. ``se`` is the delta's standard error
    from the observed per-item differences (their disagreement), ``df`` None (normal).
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
        "se": math.sqrt(sum(task.variance for task in tasks)) / len(tasks),
        "df": None,
    }


def seed_level_test(baseline, model, paired: bool) -> dict:
    """The method-level comparison of one score: runs (seeds) as the unit.

    ``baseline``, ``model``: one value per seed, shape (seeds,), or (..., seeds) for many
    comparisons at once (then every value returned has shape (...)). ``paired``: the i-th seeds
    of the two arms share initial weights and data order (both need the same number of seeds):
    a t test on the per-seed deltas; otherwise Welch's unequal-variance t test. Returns delta
    (mean of model minus mean of baseline), its 95% t interval, p, test, se, df, ``seeds`` (per
    arm) and ``zero_spread``: the spread the test divides by is exactly 0 (then p, interval, se
    and df are NaN: a spread of 0 is not a measurement of seed noise, never a certainty). With
    fewer than 2 seeds in an arm (or pair) nothing is estimable: NaNs as well.
    """
    base, other = np.asarray(baseline, dtype=np.float64), np.asarray(model, dtype=np.float64)
    if paired and base.shape[-1] != other.shape[-1]:
        raise ValueError(f"paired by seed needs as many seeds in each arm; got {base.shape[-1]} and {other.shape[-1]}")
    seeds = [base.shape[-1], other.shape[-1]]
    delta = other.mean(axis=-1) - base.mean(axis=-1)
    undefined = np.full(delta.shape, math.nan)
    result = {"delta": delta, "ci95_low": undefined, "ci95_high": undefined, "p_value": undefined, "se": undefined,
              "df": undefined, "seeds": seeds, "zero_spread": np.zeros(delta.shape, dtype=bool),
              "test": "paired t on per-seed deltas" if paired else "Welch t on per-seed scores"}
    if min(seeds) >= 2:
        if paired:
            spread = np.std(other - base, axis=-1, ddof=1)
            zero, se = spread == 0, spread / math.sqrt(seeds[0])
        else:  # one arm's spread of 0 is already no measurement of its noise
            spreads = [np.std(values, axis=-1, ddof=1) for values in (base, other)]
            zero = (spreads[0] == 0) | (spreads[1] == 0)
            se = np.sqrt(spreads[0] ** 2 / seeds[0] + spreads[1] ** 2 / seeds[1])
        # scipy warns of precision loss where a spread is 0; those entries are replaced by NaN below
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            test = stats.ttest_rel(other, base, axis=-1) if paired else \
                stats.ttest_ind(other, base, axis=-1, equal_var=False)
            interval = test.confidence_interval(1 - ALPHA)
        keep = ~zero
        for key, value in (("ci95_low", interval.low), ("ci95_high", interval.high), ("p_value", test.pvalue),
                           ("se", se), ("df", test.df)):
            result[key] = np.where(keep, np.broadcast_to(value, delta.shape), math.nan)
        result["zero_spread"] = zero
    if np.ndim(delta) == 0:
        result.update({key: (bool(value) if key == "zero_spread" else float(value))
                       for key, value in result.items() if key not in ("seeds", "test")})
    return result


def holm(p_values: list[float]) -> list[float]:
    """Holm step-down adjusted p-values (family-wise error rate); an undefined (NaN) p counts as 1."""
    values = [1.0 if math.isnan(p) else p for p in p_values]
    order = sorted(range(len(values)), key=values.__getitem__)
    adjusted, running = [0.0] * len(values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(values) - rank) * values[index]))
        adjusted[index] = running
    return adjusted


def adjust_seed_level_tests(tests: list[dict]) -> None:
    """Holm over ``tests`` (``seed_level_test`` records, one family), in place: each gets ``p_adjusted`` and
    ``significant`` (an effect: adjusted p < ALPHA, with ``MIN_SEEDS``+ seeds per arm and a spread above 0)."""
    for test, adjusted in zip(tests, holm([test["p_value"] for test in tests])):
        test["p_adjusted"] = adjusted
        test["significant"] = min(test["seeds"]) >= MIN_SEEDS and not test["zero_spread"] and adjusted < ALPHA


def _power(effect: float, se: float, df: float | None, alpha: float) -> float:
    """Power of a two-sided level-``alpha`` test of a true ``effect`` whose estimate has ``se``."""
    if df is None or math.isinf(df):
        z = stats.norm.ppf(1 - alpha / 2)
        return float(stats.norm.sf(z - effect / se) + stats.norm.cdf(-z - effect / se))
    t, shift = stats.t.ppf(1 - alpha / 2, df), effect / se
    upper, lower = stats.nct.sf(t, df, shift), stats.nct.cdf(-t, df, shift)  # scipy's nct can return NaN far out
    upper = (1.0 if shift > t else 0.0) if math.isnan(upper) else upper
    return float(upper + (0.0 if math.isnan(lower) else lower))


def detectable_difference(se: float, df: float | None = None, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true difference a two-sided level-``alpha`` test detects with ``power``.

    ``se``: the standard error of the delta the test uses; ``df``: its t degrees of freedom
    (None: a normal test). NaN when ``se`` is not a positive number.
    """
    if not se > 0 or math.isnan(se):
        return math.nan
    if df is None or math.isinf(df):
        return float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * se)
    high = se
    while _power(high, se, df, alpha) < power:
        high *= 2
    return float(optimize.brentq(lambda effect: _power(effect, se, df, alpha) - power, 0.0, high, xtol=1e-9 * se))


def seeds_needed(effect: float, seed_sd: float, paired: bool, alpha: float = ALPHA, power: float = POWER, *,
                 model_sd: float | None = None) -> int | None:
    """Seeds per arm for ``seed_level_test`` to detect ``effect`` with ``power`` at level ``alpha``.

    ``seed_sd``: paired, the standard deviation of the per-seed deltas; unpaired, the seed
    standard deviation of the baseline's scores (``model_sd`` the model's, default the same).
    At least ``MIN_SEEDS``; None when more than ``MAX_SEEDS`` would be needed (or ``effect`` is 0).
    """
    if not seed_sd > 0 or (model_sd is not None and not model_sd > 0):
        raise ValueError(f"seeds_needed needs seed standard deviations > 0; got {seed_sd} and {model_sd}")
    if effect == 0:
        return None
    other = seed_sd if model_sd is None else model_sd

    def enough(seeds: int) -> bool:
        if paired:
            se, df = seed_sd / math.sqrt(seeds), seeds - 1
        else:
            variance = (seed_sd**2 + other**2) / seeds
            se = math.sqrt(variance)
            df = variance**2 / ((seed_sd**4 + other**4) / (seeds**2 * (seeds - 1)))
        return _power(abs(effect), se, df, alpha) >= power

    if not enough(MAX_SEEDS):
        return None
    low, high = MIN_SEEDS - 1, MAX_SEEDS  # power grows with seeds: bisect for the first that is enough
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return high
