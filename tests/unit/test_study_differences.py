"""The study's differences to "off": seeds paired, Holm over every test, no claim below 3 seeds."""

import math

import numpy as np

from olmoe_gatepro.pipelines.study import DIFFERENCE_COLUMNS, _differences_markdown, differences_to_off


def _records(rng, coactivation_shift: float, steps: int = 8, layers: int = 2, own=None) -> list[dict]:
    """A run's records: its seed's level (from ``rng``), the run's own noise (from ``own``, if given),
    ``coactivation_shift`` on co-activation, and step noise."""
    level = rng.normal(0, 0.01, size=4) + (own.normal(0, 0.005, size=4) if own is not None else 0)
    return [{"step": 10 * (step + 1), "held_out_loss": 3.0 + rng.normal(0, 0.01),
             "layers": [{"partner_coactivation": 0.4 + level[0] + coactivation_shift + rng.normal(0, 0.001),
                         "avg_cosine_similarity": 0.1 + level[1] + rng.normal(0, 0.001),
                         "spectral_entropy": 2.0 + level[2] + rng.normal(0, 0.001),
                         "zero_token_count": 3 + level[3] + rng.normal(0, 0.001)} for _ in range(layers)]}
            for step in range(steps)]


def _results(shifts: dict[str, float], seeds: int, lbl: float = 0.01, own_noise=("shifted",)) -> list[dict]:
    """Runs whose seed level is shared by every setting (the pairing the study's seeds give); the
    settings in ``own_noise`` add noise of their own, the others equal "off" but for their shift."""
    results = []
    for seed in range(seeds):
        for index, (setting, shift) in enumerate(shifts.items()):
            own = np.random.default_rng([seed, index]) if setting in own_noise else None
            results.append({"setting": setting, "lb_loss_weight": lbl, "seed": seed,
                            "records": _records(np.random.default_rng(seed), shift, own=own)})
    return results


def test_a_planted_shift_is_an_effect_and_no_shift_is_none():
    rows = differences_to_off(_results({"off": 0.0, "shifted": -0.1, "same": 0.0}, seeds=3))
    by_setting = {row["setting"]: row["tests"] for row in rows}
    assert set(by_setting) == {"shifted", "same"} and all(row["seeds"] == 3 for row in rows)
    shifted = by_setting["shifted"]["partner_coactivation"]
    assert shifted["significant"] and -12 < shifted["delta"] < -8  # points: the planted 10 plus the runs' own noise
    assert shifted["ci95_low"] < shifted["delta"] < shifted["ci95_high"] < 0
    assert not any(by_setting["shifted"][key]["significant"] for key, *_ in DIFFERENCE_COLUMNS[1:])
    # the same values as "off": a difference of exactly 0 in every seed, a spread of 0, no claim
    same = by_setting["same"]["partner_coactivation"]
    assert same["zero_spread"] and not same["significant"]
    tests = sum(len(row["tests"]) for row in rows)
    assert tests == 2 * len(DIFFERENCE_COLUMNS)
    assert shifted["p_adjusted"] >= shifted["p_value"] and shifted["p_adjusted"] <= tests * shifted["p_value"]
    table = _differences_markdown(rows)
    rows_of_table = table.splitlines()[4:]  # after the legend, a blank line and the header
    assert f"over all {tests} tests" in table and sum(line.count("**") for line in rows_of_table) == 2  # the planted effect


def test_noise_alone_is_not_an_effect_and_two_seeds_make_no_claim():
    rng = np.random.default_rng(7)
    results = []
    for seed in range(3):  # "noisy" draws its own seed noise: no effect, but a spread
        for setting in ("off", "noisy"):
            results.append({"setting": setting, "lb_loss_weight": 0.0, "seed": seed, "records": _records(rng, 0.0)})
    (row,) = differences_to_off(results)
    assert not any(test["significant"] for test in row["tests"].values())
    assert all(not math.isnan(test["ci95_low"]) for test in row["tests"].values())
    (two,) = differences_to_off(_results({"off": 0.0, "shifted": -0.1}, seeds=2))
    test = two["tests"]["partner_coactivation"]
    assert test["p_adjusted"] < 0.05 and not test["significant"]  # a real, clear shift, but 2 seeds claim nothing
