"""Calibration of compare's statistics on simulated results with a known answer (pure numpy/scipy).

Simulated benchmarks: five tasks of different sizes, fixed item difficulties; a trained model is
a seed whose ability (logit scale) is drawn around its arm's, so seeds differ as real training
runs do; each item is right with probability sigmoid(ability + easiness). A/A: both arms drawn
from the same distribution, so every flagged effect is a false one.
"""

import numpy as np
import pytest
from scipy import stats

from olmoe_gatepro.evaluation.paired_stats import (
    ALPHA,
    MIN_SEEDS,
    Z_CRITICAL,
    PairedTask,
    detectable_difference,
    holm,
    item_paired_test,
    mcnemar_exact_p,
    seed_level_test,
    seeds_needed,
)

SIZES = (1400, 1000, 300, 180, 100)  # several task sizes, largest first
EXPERIMENTS = 2000
SEED_SD = 0.15  # seed-to-seed ability spread, logits (about 3.5 points of accuracy near 50%)


def _scores(rng, easiness: np.ndarray, abilities: np.ndarray) -> np.ndarray:
    """Percent scores (experiments, seeds) of models with ``abilities`` (experiments, seeds) on the items."""
    p = 1 / (1 + np.exp(-(abilities[..., None] + easiness)))
    return 100 * (rng.random(p.shape) < p).mean(axis=-1)


def _arms(rng, seeds: int, paired: bool, shift: float = 0.0):
    """Per task, (baseline, model) percent scores, each (EXPERIMENTS, seeds).

    Paired: the i-th seeds of both arms share initialisation (half of the ability variance)."""
    shared = rng.normal(0, SEED_SD / np.sqrt(2), (EXPERIMENTS, seeds)) if paired else 0.0
    own = SEED_SD / np.sqrt(2) if paired else SEED_SD
    abilities = [shared + rng.normal(0, own, (EXPERIMENTS, seeds)) for _ in range(2)]
    abilities[1] = abilities[1] + shift
    tasks = []
    for size in SIZES:
        easiness = rng.normal(0, 1.5, size)
        tasks.append(tuple(_scores(rng, easiness, arm) for arm in abilities))
    return tasks


def _rejections(tasks, paired: bool):
    """(per task: unadjusted p < 5%) and (per task: Holm-adjusted p < 5%), each (experiments, tasks)."""
    p = np.stack([seed_level_test(base, model, paired)["p_value"] for base, model in tasks], axis=1)
    adjusted = np.array([holm(list(row)) for row in p])
    return p < ALPHA, adjusted < ALPHA


@pytest.mark.parametrize("paired", [True, False])
def test_no_effect_gives_the_nominal_false_effect_rate_per_column_and_family_wise(paired):
    rng = np.random.default_rng(1 if paired else 2)
    tasks = _arms(rng, MIN_SEEDS, paired)
    unadjusted, adjusted = _rejections(tasks, paired)
    per_column = unadjusted.mean(axis=0)
    # 2000 experiments: a rate's standard error is 0.5 points; 4 of them above 5%. Below: the paired
    # t test is exact (3 of them), Welch's with 3 seeds a little conservative
    low = 0.035 if paired else 0.02
    assert np.all((per_column > low) & (per_column < 0.07)), per_column
    family_wise = adjusted.any(axis=1).mean()
    assert family_wise < ALPHA + 0.015, family_wise
    assert unadjusted.any(axis=1).mean() > (0.17 if paired else 0.1)  # five unadjusted columns: up to 23%


def test_the_old_rule_fails_this_calibration():
    """|delta| > 1.96 x the seed spread of the difference, with 2 seeds: the normal quantile where the
    t quantile (about 4.3 with these degrees of freedom) belongs flags about 1 in 5 A/A columns."""
    rng = np.random.default_rng(7)
    tasks = _arms(rng, 2, paired=False)
    old = np.stack([np.abs(model.mean(1) - base.mean(1))
                    > Z_CRITICAL * np.sqrt(base.var(1, ddof=1) / 2 + model.var(1, ddof=1) / 2)
                    for base, model in tasks], axis=1)
    assert old.mean() > 3 * ALPHA


def test_the_primary_endpoint_alone_is_at_the_nominal_rate():
    rng = np.random.default_rng(3)
    tasks = _arms(rng, MIN_SEEDS, paired=True)
    sizes = np.array(SIZES, dtype=float)
    pooled = [sum(task[arm] * size for task, size in zip(tasks, sizes)) / sizes.sum() for arm in (0, 1)]
    rate = (seed_level_test(pooled[0], pooled[1], paired=True)["p_value"] < ALPHA).mean()
    assert 0.03 < rate < 0.07


def test_a_planted_effect_is_found_with_the_seeds_the_power_analysis_asks_for():
    rng = np.random.default_rng(4)
    effect, delta_sd = 1.5, 1.2  # points; per-seed deltas ~ N(effect, delta_sd) on the first task, 0 elsewhere
    seeds = seeds_needed(effect, delta_sd, paired=True, alpha=ALPHA / len(SIZES))
    assert seeds > MIN_SEEDS

    def found(count):
        base = rng.normal(50, 2, (1000, len(SIZES), count))
        model = base + rng.normal(0, delta_sd, base.shape)
        model[:, 0] += effect
        p = seed_level_test(base, model, paired=True)["p_value"]
        return np.mean([holm(list(row))[0] < ALPHA for row in p])

    assert 0.74 < found(seeds) < 0.88  # 80% power, as promised (1000 experiments: +-1.3 points)
    assert found(MIN_SEEDS) < 0.3  # with the bare minimum of seeds the effect is mostly missed


def test_an_effect_of_the_detectable_size_is_found_with_80_percent_power_at_checkpoint_level():
    rng = np.random.default_rng(5)
    items, disagreement = 2000, 0.15
    se = np.sqrt(disagreement / items)  # McNemar: the variance of a delta is the discordant share / n
    effect = detectable_difference(se)
    won, lost = (disagreement + effect) / 2, (disagreement - effect) / 2
    draws = rng.multinomial(items, [won, lost, 1 - won - lost], size=600)
    rate = np.mean([mcnemar_exact_p(int(w), int(l)) < ALPHA for w, l, _ in draws])
    assert 0.74 < rate < 0.87
    # and the standard error compare uses, from the observed per-item differences, is that one
    diffs = np.array([1.0] * int(draws[0, 0]) + [-1.0] * int(draws[0, 1]) + [0.0] * int(draws[0, 2]))
    assert item_paired_test([PairedTask(diffs, np.ones_like(diffs))], resamples=200)["se"] == pytest.approx(se, rel=0.1)


def test_checkpoint_level_a_a_is_at_most_nominal():
    rng = np.random.default_rng(6)
    draws = rng.multinomial(100, [0.1, 0.1, 0.8], size=2000)  # 20% of 100 items disagree, no direction
    rate = np.mean([mcnemar_exact_p(int(w), int(l)) < ALPHA for w, l, _ in draws])
    assert rate < ALPHA + 0.012  # the exact test is conservative


def test_two_seeds_have_the_t_quantile_of_one_degree_of_freedom():
    # why 2 seeds cannot carry a claim: a 95% interval is the delta +- 12.7 standard errors
    result = seed_level_test([50.0, 52.0], [53.0, 54.0], paired=True)
    half = (result["ci95_high"] - result["ci95_low"]) / 2
    assert half == pytest.approx(stats.t.ppf(0.975, 1) * result["se"]) and half > 12 * result["se"]
