"""Paired statistics against values computed by hand."""

import math

import numpy as np
import pytest
from scipy import stats

from olmoe_gatepro.evaluation.paired_stats import (
    MIN_SEEDS,
    Z_CRITICAL,
    PairedTask,
    bootstrap_ci,
    detectable_difference,
    holm,
    item_paired_test,
    mcnemar_exact_p,
    seed_level_test,
    seeds_needed,
    sign_flip_p,
)


def _binary(model_only, baseline_only, agree):
    diffs = np.array([1.0] * model_only + [-1.0] * baseline_only + [0.0] * agree)
    return PairedTask(diffs, np.ones_like(diffs))


@pytest.mark.parametrize(
    "model_only, baseline_only, expected",
    [
        (1, 9, 2 * (1 + 10) / 2**10),  # 2 * P(X <= 1), X ~ Bin(10, 1/2) = 22/1024
        (9, 1, 2 * (1 + 10) / 2**10),  # two-sided: symmetric
        (0, 6, 2 / 2**6),  # 2 * P(X = 0) = 1/32
        (3, 4, 1.0),  # 2 * P(X <= 3) = 2 * 64/128 > 1
        (0, 0, 1.0),  # no discordant pair
        (2, 8, 2 * (1 + 10 + 45) / 2**10),
    ],
)
def test_exact_mcnemar_matches_the_binomial_tail(model_only, baseline_only, expected):
    assert mcnemar_exact_p(model_only, baseline_only) == pytest.approx(expected, rel=1e-12)


def test_item_paired_test_uses_mcnemar_for_one_binary_task():
    result = item_paired_test([_binary(1, 9, 90)])
    assert result["test"] == "exact McNemar" and result["n"] == 100
    assert result["p_value"] == pytest.approx(22 / 1024) and result["delta"] == pytest.approx(-0.08)
    # the standard error from the observed disagreement: n s^2 / n^2 with s^2 the variance of the diffs
    diffs = np.array([1.0] + [-1.0] * 9 + [0.0] * 90)
    assert result["se"] == pytest.approx(math.sqrt(diffs.var(ddof=1) / 100)) and result["df"] is None


def test_bootstrap_interval_contains_the_delta_and_shrinks_with_n():
    small = _binary(12, 4, 34)  # delta 8 / 50 = 0.16
    large = PairedTask(np.tile(small.diffs, 16), np.tile(small.sizes, 16))  # same delta, 16x the items
    low_s, high_s = bootstrap_ci([small])
    low_l, high_l = bootstrap_ci([large])
    assert low_s < small.delta < high_s and low_l < large.delta < high_l
    # the width of a mean's interval scales as 1 / sqrt(n): about 4x narrower here
    assert (high_s - low_s) / (high_l - low_l) == pytest.approx(4.0, rel=0.15)
    assert bootstrap_ci([small], seed=3) == bootstrap_ci([small], seed=3)  # seeded: reproducible


def test_sign_flip_is_one_without_differences_and_tiny_for_a_consistent_one():
    assert sign_flip_p([_binary(0, 0, 40)]) == 1.0
    assert item_paired_test([_binary(0, 0, 40)])["ci95_low"] == 0.0
    # 30 items all won by the model: P(all 30 signs agree) = 2 / 2^30, so no resample reaches it
    assert sign_flip_p([_binary(30, 0, 0)], resamples=2000) == pytest.approx(1 / 2001)


def test_continuous_differences_use_the_permutation_test_without_a_floor():
    margins = PairedTask(np.array([0.5, 0.25, 0.75, 0.5]), np.ones(4), counts=False)
    result = item_paired_test([margins])
    assert result["test"] == "paired sign-flip permutation" and not margins.binary
    # all four positive: only the all-plus and all-minus flips (2 of 16) are as extreme
    assert result["p_value"] == pytest.approx(2 / 16, abs=0.02)
    assert result["se"] == pytest.approx(math.sqrt(np.var([0.5, 0.25, 0.75, 0.5], ddof=1) / 4))
    same = PairedTask(np.zeros(5), np.ones(5), counts=False)
    assert same.variance == 0.0 and _binary(0, 0, 5).variance == pytest.approx(5 * (1 / 5) / 25)  # floor: counts only


def test_clustered_and_averaged_deltas_weight_instances():
    clustered = PairedTask(np.array([2.0, -1.0, 0.0]), np.array([7.0, 7.0, 6.0]))  # 3 questions, 20 instances
    assert clustered.delta == pytest.approx(1 / 20) and not clustered.binary
    result = item_paired_test([clustered, _binary(3, 1, 6)])  # the average: mean of the two tasks' deltas
    assert result["delta"] == pytest.approx((1 / 20 + 2 / 10) / 2)
    assert result["test"] == "paired sign-flip permutation" and result["n"] == 13
    pooled = PairedTask.pooled([clustered, _binary(3, 1, 6)])  # every instance counted once: 3 / 30
    assert pooled.delta == pytest.approx((1 + 2) / 30) and len(pooled.diffs) == 13


def test_paired_seed_test_is_a_t_test_on_the_per_seed_deltas():
    base, model = [50.0, 52.0, 47.0], [51.0, 54.0, 50.0]  # deltas 1, 2, 3: mean 2, sd 1
    result = seed_level_test(base, model, paired=True)
    se = 1 / math.sqrt(3)
    assert result["delta"] == pytest.approx(2.0) and result["se"] == pytest.approx(se) and result["df"] == 2
    assert result["p_value"] == pytest.approx(2 * stats.t.sf(2 / se, 2))
    half = stats.t.ppf(0.975, 2) * se  # 4.30 x se: the t quantile with 2 degrees of freedom, not 1.96
    assert (result["ci95_low"], result["ci95_high"]) == pytest.approx((2 - half, 2 + half))
    assert result["seeds"] == [3, 3] and result["test"] == "paired t on per-seed deltas" and not result["zero_spread"]


def test_unpaired_seed_test_is_welch():
    base, model = [50.0, 52.0, 47.0, 51.0], [55.0, 49.0, 58.0]
    result = seed_level_test(base, model, paired=False)
    vb, vm = np.var(base, ddof=1) / 4, np.var(model, ddof=1) / 3
    df = (vb + vm) ** 2 / (vb**2 / 3 + vm**2 / 2)  # Welch-Satterthwaite
    t = (np.mean(model) - np.mean(base)) / math.sqrt(vb + vm)
    assert result["df"] == pytest.approx(df) and result["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), df))
    assert result["se"] == pytest.approx(math.sqrt(vb + vm)) and result["test"] == "Welch t on per-seed scores"
    with pytest.raises(ValueError, match="as many seeds in each arm"):
        seed_level_test(base, model, paired=True)


@pytest.mark.parametrize("base, model, paired", [
    ([20.0, 20.0, 20.0], [15.0, 15.0, 15.0], False),  # the smoke's ARC-Challenge: 20.00 +- 0.00 vs 15.00 +- 0.00
    ([20.0, 25.0, 20.0], [15.0, 20.0, 15.0], True),  # the same delta on every seed pair
    ([20.0, 25.0, 20.0], [15.0, 15.0, 15.0], False),  # one arm without spread
])
def test_a_zero_seed_spread_is_flagged_never_certain(base, model, paired):
    result = seed_level_test(base, model, paired)
    assert result["zero_spread"] and math.isnan(result["p_value"]) and math.isnan(result["ci95_low"])
    assert result["delta"] == pytest.approx(np.mean(model) - np.mean(base))


def test_seed_level_test_many_comparisons_at_once():
    rng = np.random.default_rng(0)
    base, model = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    batch = seed_level_test(base, model, paired=True)
    for row in range(4):
        one = seed_level_test(base[row], model[row], paired=True)
        assert batch["p_value"][row] == pytest.approx(one["p_value"])
        assert batch["ci95_high"][row] == pytest.approx(one["ci95_high"])
    single = seed_level_test([1.0], [2.0], paired=False)  # one seed: nothing estimable
    assert math.isnan(single["p_value"]) and single["delta"] == 1.0


def test_holm_by_hand():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> kept monotone at 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, math.nan]) == pytest.approx([1.0, 1.0])  # an undefined p counts as 1
    assert holm([0.9, 0.4]) == pytest.approx([0.9, 0.8]) and holm([0.9, 0.8]) == [1.0, 1.0]  # capped at 1


def test_detectable_difference_normal_and_t():
    z = Z_CRITICAL + stats.norm.ppf(0.8)
    assert detectable_difference(0.02) == pytest.approx(z * 0.02)
    assert Z_CRITICAL == pytest.approx(1.959963984540054)
    # with few degrees of freedom the t test needs a larger difference; many: the normal one
    assert detectable_difference(1.0, df=2) > 2 * detectable_difference(1.0)
    assert detectable_difference(1.0, df=10_000) == pytest.approx(detectable_difference(1.0), rel=1e-3)
    # a stricter level needs more
    assert detectable_difference(1.0, alpha=0.01) > detectable_difference(1.0)
    assert math.isnan(detectable_difference(0.0)) and math.isnan(detectable_difference(math.nan))


def test_seeds_needed_grows_with_spread_and_shrinks_with_effect():
    assert seeds_needed(10.0, 0.1, paired=True) == MIN_SEEDS  # never fewer than a method-level test needs
    few, many = seeds_needed(1.0, 1.0, paired=True), seeds_needed(0.5, 1.0, paired=True)
    assert MIN_SEEDS < few < many
    assert seeds_needed(1.0, 1.0, paired=False) > few  # unpaired: two arms' noise, not one delta's
    assert seeds_needed(0.001, 10.0, paired=True) is None  # beyond MAX_SEEDS
    with pytest.raises(ValueError, match="> 0"):
        seeds_needed(1.0, 0.0, paired=True)
