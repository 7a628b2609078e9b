"""Paired statistics against values computed by hand."""

import math

import numpy as np
import pytest

from olmoe_gatepro.evaluation.paired_stats import (
    PairedTask,
    bootstrap_ci,
    mcnemar_exact_p,
    paired_test,
    sign_flip_p,
    smallest_detectable_difference,
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


def test_paired_test_uses_mcnemar_for_one_binary_task():
    result = paired_test([_binary(1, 9, 90)])
    assert result["test"] == "exact McNemar" and result["n"] == 100
    assert result["p_value"] == pytest.approx(22 / 1024) and result["delta"] == pytest.approx(-0.08)


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
    assert paired_test([_binary(0, 0, 40)])["ci95_low"] == 0.0
    # 30 items all won by the model: P(all 30 signs agree) = 2 / 2^30, so no resample reaches it
    assert sign_flip_p([_binary(30, 0, 0)], resamples=2000) == pytest.approx(1 / 2001)


def test_clustered_and_averaged_deltas_weight_instances():
    clustered = PairedTask(np.array([2.0, -1.0, 0.0]), np.array([7.0, 7.0, 6.0]))  # 3 questions, 20 instances
    assert clustered.delta == pytest.approx(1 / 20) and not clustered.binary
    result = paired_test([clustered, _binary(3, 1, 6)])  # the average: mean of the two tasks' deltas
    assert result["delta"] == pytest.approx((1 / 20 + 2 / 10) / 2)
    assert result["test"] == "paired sign-flip permutation" and result["n"] == 13


def test_smallest_detectable_difference_from_the_sample_size():
    z = 1.959963984540054 + 0.8416212335729143
    assert smallest_detectable_difference([0.86], [100]) == pytest.approx(z * math.sqrt(2 * 0.86 * 0.14 / 100))
    # the average of two tasks: variances add, divided by 2^2
    both = smallest_detectable_difference([0.5, 0.5], [100, 400])
    assert both == pytest.approx(z * math.sqrt((0.5 / 100 + 0.5 / 400) / 4))
    assert smallest_detectable_difference([0.5], [400]) < smallest_detectable_difference([0.5], [100])
