import csv
import json
import math
import os
import shutil

import numpy as np
import pytest
from scipy import stats

from olmoe_gatepro.cli import main
from olmoe_gatepro.evaluation import paired_stats
from olmoe_gatepro.evaluation.compare import compare
from olmoe_gatepro.evaluation.results import SCHEMA, load_result

TASK_ITEMS = {"mmlu": 200, "hellaswag": 100, "arc_challenge": 100, "piqa": 100, "copa": 100}


def _outcomes(correct: dict[str, set[int]]) -> dict[str, list[bool]]:
    return {task: [i in correct.get(task, set()) for i in range(n)] for task, n in TASK_ITEMS.items()}


def _write(folder, label, outcomes, metrics=None, samples=True, gatepro=None, stderr=True, item_id=None,
           margins=False):
    """A run folder whose result and per-item file agree (scores are the items' accuracy).

    ``item_id(task, i)``: the items' ids (default ``i``); ``margins``: True gives each item
    ``_margin(i, correct)``, a function ``margins(task, i, correct)`` its own."""
    folder.mkdir(parents=True)
    tasks = {}
    for task, values in outcomes.items():
        p = sum(values) / len(values)
        tasks[task] = {"score": p, "stderr": (p * (1 - p) / (len(values) - 1)) ** 0.5 if stderr else None,
                       "samples": len(values), "metric": "acc"}
    result = {"schema": SCHEMA, "label": label, "model": str(folder), "revision": None, "suite": "lm-eval",
              "limit": None, "gatepro": gatepro, "tasks": tasks}
    (folder / "eval_results.json").write_text(json.dumps(result))
    if samples:
        item_id = item_id or (lambda task, i: str(i))
        lines = [json.dumps({"task": t, "item": item_id(t, i), "correct": c,
                             **({"margin": margins(t, i, c) if callable(margins) else _margin(i, c)} if margins else {})})
                 for t, v in outcomes.items() for i, c in enumerate(v)]
        (folder / "samples.lm-eval.jsonl").write_text("\n".join(lines) + "\n")
    if metrics:
        (folder / "gatepro_metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return str(folder)


BASE = {task: set(range(0, n, 2)) for task, n in TASK_ITEMS.items()}  # 50% on every task


def _margin(i: int, correct: bool) -> float:
    """A made-up margin of item i: positive exactly when it is right."""
    return (0.5 + (i % 3) * 0.25) * (1 if correct else -1)


def _with(changes):
    """BASE with items added to (positive) or removed from (negative) the correct sets."""
    correct = {task: set(items) for task, items in BASE.items()}
    for task, (won, lost) in changes.items():
        correct[task] |= set(won)
        correct[task] -= set(lost)
    return _outcomes(correct)


def _quiet(_):
    pass


def test_one_run_each_is_a_checkpoint_comparison_holm_adjusted(tmp_path):
    base = _write(tmp_path / "base", "baseline", _outcomes(BASE))
    # COPA: the model wins 9 items the baseline lost and loses 1 it won: exact McNemar p = 22/1024
    other = _write(tmp_path / "gp", "gatepro", _with({"copa": ([1, 3, 5, 7, 9, 11, 13, 15, 17], [0])}))
    comparison = compare([base, other], str(tmp_path / "out"), echo=_quiet)
    columns = comparison["rows"][1]["columns"]
    copa = columns["copa"]
    assert copa["delta"] == pytest.approx(8.0) and copa["p_value"] == pytest.approx(22 / 1024)
    assert copa["level"] == "checkpoints" and copa["test"] == "exact McNemar" and copa["seeds_per_arm"] == [1, 1]
    # Holm over the five task columns: the other four have p = 1, so COPA's p is multiplied by 5
    assert copa["p_adjusted"] == pytest.approx(5 * 22 / 1024) and not copa["significant"]
    assert columns["mmlu"]["p_value"] == 1.0 and columns["mmlu"]["p_adjusted"] == 1.0
    # the primary endpoint, all 600 items pooled, is tested alone: the same 9 against 1
    pooled = columns["pooled"]
    assert pooled["delta"] == pytest.approx(100 * 8 / 600) and pooled["p_value"] == pytest.approx(22 / 1024)
    assert pooled["significant"] and pooled["role"] == "primary" and pooled["n"] == 600
    assert columns["avg"]["role"] == "descriptive" and not columns["avg"]["significant"]
    assert columns["hellaswag"]["paper_delta"] == pytest.approx(0.4)
    written = json.loads((tmp_path / "out" / "comparison.json").read_text())
    keys = {"delta", "ci95_low", "ci95_high", "p_value", "p_adjusted", "significant", "test", "level", "seeds_per_arm",
            "n", "detectable_difference", "paper_delta", "seeds_needed"}
    assert keys <= set(written["rows"][1]["columns"]["copa"])
    assert written["columns"] == ["mmlu", "hellaswag", "arc_challenge", "piqa", "copa", "avg", "pooled"]
    table = (tmp_path / "out" / "table.md").read_text()
    assert table.index("## Verdict") < table.index("| model |")
    assert "**gatepro** vs baseline: one run each; no claim about the method can be made (a method-level test" in table
    assert "Primary endpoint (all 600 items pooled): better by 1.33 points" in table and "these checkpoints differ" in table
    assert "cannot test the paper's +0.7 on MMLU (detectable here: ≥ " in table
    assert "Seeds a method-level claim would need: unknown, no seed spread was measured" in table
    assert "| model | MMLU | HellaSwag | ARC-Challenge | PIQA | COPA | average | all items (primary) |" in table
    assert "(Δ +8.00 [" in table and "(Δ +1.33† [" in table and "Holm-adjusted per row" in table
    assert (tmp_path / "out" / "deltas.png").stat().st_size > 10_000


def test_a_result_against_itself_is_no_difference(tmp_path):
    base = _write(tmp_path / "base", "baseline", _with({"copa": ([1], [])}))
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    data = json.loads((copy / "eval_results.json").read_text())
    (copy / "eval_results.json").write_text(json.dumps({**data, "label": "same"}))
    comparison = compare([base, str(copy)], str(tmp_path / "out"), echo=_quiet)
    for column in comparison["columns"]:
        entry = comparison["rows"][1]["columns"][column]
        assert entry["delta"] == 0 and entry["p_value"] == 1.0 and not entry["significant"]
        assert entry["detectable_difference"] > 0  # agreeing on every item does not make every difference detectable
    table = (tmp_path / "out" / "table.md").read_text()
    assert "Primary endpoint (all 600 items pooled): no difference detected" in table
    assert "Per task: no difference detected on MMLU, HellaSwag" in table
    # no discordant item at all: the interval of the pooled delta is the floor's (one discordant item in 600,
    # +-0.33 points), which holds 0 and lies below the paper's implied +0.74; COPA's (+-1.96) holds +0.7
    assert "The 95% interval lies below the paper's (implied) +0.74 on all items (primary): these checkpoints" in table


def test_the_same_file_twice_is_refused_and_equal_labels_are_renamed(tmp_path, capsys):
    base = _write(tmp_path / "base", "baseline", _outcomes(BASE))
    with pytest.raises(SystemExit):
        main(["compare", base, base + "/eval_results.json", "--out", str(tmp_path / "out")])
    assert "is given twice" in capsys.readouterr().err
    assert not (tmp_path / "out" / "table.md").exists()
    other = _write(tmp_path / "other", "baseline", _outcomes(BASE))
    notes = []
    comparison = compare([base, other], str(tmp_path / "out"), echo=notes.append)
    assert [row["label"] for row in comparison["rows"]] == ["baseline", "baseline (2)"]
    assert any("shown as 'baseline (2)'" in note for note in notes)


def test_the_margin_is_tested_beside_accuracy(tmp_path):
    def shifted(task, i, correct):  # the model: every margin 0.1 or 0.2 higher, two COPA items now right
        return _margin(i, correct) + (0.1 if i % 2 else 0.2) if not (task == "copa" and i in (1, 3)) else 0.3

    base = _write(tmp_path / "base", "baseline", _outcomes(BASE), margins=True)
    other = _write(tmp_path / "gp", "gatepro", _with({"copa": ([1, 3], [])}), margins=shifted)
    comparison = compare([base, other], str(tmp_path / "out"), echo=_quiet)
    margins = comparison["rows"][1]["margins"]
    for task, items in TASK_ITEMS.items():
        expected = np.mean([shifted(task, i, i in BASE[task] or (task == "copa" and i in (1, 3))) - _margin(i, i in BASE[task])
                            for i in range(items)])
        assert margins[task]["delta"] == pytest.approx(expected)
        assert margins[task]["level"] == "checkpoints" and margins[task]["test"] == "paired sign-flip permutation"
        assert margins[task]["significant"]  # every item moved the same way: no resample is as extreme
    copa = comparison["rows"][1]["columns"]["copa"]
    assert not copa["significant"] and copa["p_value"] == pytest.approx(0.5)  # accuracy: 2 discordant items
    # the margin separates the two rows several times better than accuracy on COPA; accuracy did not move elsewhere
    assert margins["copa"]["snr_ratio"] > 3 and math.isnan(margins["mmlu"]["snr_ratio"])
    table = (tmp_path / "out" / "table.md").read_text()
    assert "## Margin of the right choice" in table and "Margin of the right choice over the best wrong one" in table
    no_margins = _write(tmp_path / "old", "old", _outcomes(BASE))  # files written before margins existed
    assert compare([base, no_margins], str(tmp_path / "old-out"), echo=_quiet)["rows"][1]["margins"] is None


def _seeds(tmp_path, name, piqa_wins):
    """One run folder per seed: BASE with ``piqa_wins[i]`` more PIQA items right in seed i."""
    return [_write(tmp_path / f"{name}{i}", name, _with({"piqa": (range(1, 1 + 2 * wins, 2), [])}))
            for i, wins in enumerate(piqa_wins)]


def test_two_seeds_make_no_claim_about_the_method(tmp_path):
    b = _seeds(tmp_path, "b", [0, 5])
    g = _seeds(tmp_path, "g", [20, 30])
    assert main(["compare", "--group", f"baseline={','.join(b)}", "--group", f"gatepro={','.join(g)}",
                 "--out", str(tmp_path / "out")]) == 0
    comparison = json.loads((tmp_path / "out" / "comparison.json").read_text())
    base, gatepro = comparison["rows"]
    assert base["columns"]["piqa"]["score"] == pytest.approx(52.5)
    assert base["columns"]["piqa"]["seed_sd"] == pytest.approx(3.5355339)  # stdev(50, 55)
    piqa = gatepro["columns"]["piqa"]
    assert piqa["delta"] == pytest.approx(22.5) and piqa["level"] == "checkpoints" and piqa["seeds_per_arm"] == [2, 2]
    assert piqa["test"] == "paired sign-flip permutation"  # seed-averaged items
    assert piqa["method_test"]["df"] == pytest.approx(1.0, rel=0.5)  # measured, shown in the JSON only
    assert piqa["seed_spread_source"] == "measured seed spread" and piqa["seeds_needed"] > 3
    assert gatepro["columns"]["copa"]["zero_seed_spread"]  # both arms have 50.00 on COPA in both seeds
    table = (tmp_path / "out" / "table.md").read_text()
    assert "52.50 ± 3.54 sd (2 seeds)" in table
    assert "**gatepro** vs baseline: 2 and 2 seeds, unpaired; no claim about the method can be made, 2 seeds in an arm" in table
    assert "Seed spread exactly 0 on MMLU, HellaSwag, ARC-Challenge, COPA" in table
    assert "Seeds per arm a method-level test would need to find the paper's deltas" in table


def test_three_paired_seeds_give_a_method_level_verdict(tmp_path):
    b = _seeds(tmp_path, "b", [0, 5, 2])
    g = _seeds(tmp_path, "g", [20, 27, 21])  # per-seed PIQA deltas +20, +22, +19 points
    comparison = compare({"baseline": b, "gatepro": g}, str(tmp_path / "out"), echo=_quiet, paired_seeds=True)
    columns = comparison["rows"][1]["columns"]
    piqa = columns["piqa"]
    deltas = [20.0, 22.0, 19.0]
    t = np.mean(deltas) / (np.std(deltas, ddof=1) / np.sqrt(3))
    assert piqa["level"] == "method" and piqa["test"] == "paired t on per-seed deltas"
    assert piqa["p_value"] == pytest.approx(2 * stats.t.sf(t, 2))
    # Holm: the other tasks have zero seed spread (p undefined, counted as 1), so PIQA's p is multiplied by 5
    assert piqa["p_adjusted"] == pytest.approx(min(1.0, 5 * piqa["p_value"])) and piqa["significant"]
    assert piqa["seeds_needed"] is not None and piqa["seed_spread_source"] == "measured seed spread, paired by seed"
    assert columns["mmlu"]["level"] == "checkpoints" and columns["mmlu"]["zero_seed_spread"]
    assert columns["pooled"]["level"] == "method" and columns["pooled"]["significant"]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "**gatepro** vs baseline: 3 and 3 seeds, paired by seed; method-level test" in table
    assert "better on PIQA by 20.33 points" in table and "(Δ +20.33* [" in table
    assert "No claim about the method on MMLU, HellaSwag, ARC-Challenge, COPA: the seed spread there is exactly 0" in table
    assert main(["compare", "--group", f"baseline={','.join(b)}", "--group", f"gatepro={','.join(g)}",
                 "--paired-seeds", "--seed-sd", "copa=2.5", "--out", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "comparison.json").read_text())["rows"][1]["columns"]["piqa"] == piqa
    unpaired = compare({"baseline": b, "gatepro": g}, str(tmp_path / "out2"), echo=_quiet)
    assert unpaired["rows"][1]["columns"]["piqa"]["test"] == "Welch t on per-seed scores"
    with pytest.raises(ValueError, match="same number of runs in every group"):
        compare({"baseline": b, "gatepro": g[:2]}, str(tmp_path / "out3"), echo=_quiet, paired_seeds=True)


def test_a_given_seed_spread_gives_seeds_needed_for_one_run_each(tmp_path):
    base = _write(tmp_path / "base", "baseline", _outcomes(BASE))
    other = _write(tmp_path / "gp", "gatepro", _outcomes(BASE))
    comparison = compare([base, other], str(tmp_path / "out"), echo=_quiet, seed_sd={"hellaswag": 0.5})
    hellaswag = comparison["rows"][1]["columns"]["hellaswag"]
    assert hellaswag["seeds_needed"] == paired_stats.seeds_needed(0.4, 0.5, False, alpha=0.05 / 5)
    assert hellaswag["seed_spread_source"] == "given seed spread (--seed-sd)"
    with pytest.raises(ValueError, match="--seed-sd: unknown column"):
        compare([base, other], str(tmp_path / "out"), echo=_quiet, seed_sd={"gsm8k": 0.5})


def test_results_without_items_fall_back_to_unpaired_standard_errors(tmp_path):
    base = _write(tmp_path / "base", "baseline", _outcomes(BASE), samples=False)
    other = _write(tmp_path / "gp", "gatepro", _with({"copa": (range(1, 21, 2), [])}), samples=False)
    comparison = compare([base, other], str(tmp_path / "out"), echo=_quiet)
    copa = comparison["rows"][1]["columns"]["copa"]
    assert not comparison["rows"][1]["paired"] and copa["test"] == "unpaired z (no per-item results)"
    assert copa["delta"] == pytest.approx(10.0)
    assert "unpaired: per-item results are missing" in (tmp_path / "out" / "table.md").read_text()


def test_items_that_do_not_match_their_result_are_refused(tmp_path):
    base = _write(tmp_path / "base", "baseline", _outcomes(BASE))
    other = _write(tmp_path / "gp", "gatepro", _outcomes(BASE))
    data = json.loads((tmp_path / "gp" / "eval_results.json").read_text())
    data["tasks"]["copa"]["score"] = 0.9
    (tmp_path / "gp" / "eval_results.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not from one evaluation"):
        compare([base, other], str(tmp_path / "out"), echo=_quiet)


def test_routing_section_and_plots_from_training_metrics(tmp_path):
    def metrics(flip):
        return [{"step": step, "tokens": step * 100, "gatepro_active": True, "layers": [
            {"zero_token_count": 3, "load_imbalance": 2.0, "flip_rate": flip * layer, "avg_cosine_similarity": 0.2,
             "avg_angle_deg": 80.0, "spectral_entropy": 3.0} for layer in (1, 2)]} for step in range(1, 6)]

    base = _write(tmp_path / "base", "baseline", _outcomes(BASE), metrics(0.0002))
    other = _write(tmp_path / "gp", "gatepro", _outcomes(BASE), metrics(0.25),
                   gatepro={"enabled": True, "penalty": 0.1, "num_competitors": 1, "hard": False})
    compare([base, other], str(tmp_path / "out"), echo=_quiet)
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| baseline | off | 0.020% | 0.040% | 0.030% |" in table
    assert "| gatepro | on, lambda 0.1 | 25.000% | 50.000% | 37.500% |" in table
    rows = list(csv.DictReader((tmp_path / "out" / "table.csv").open()))
    assert len(rows) == 14 and rows[0]["column"] == "mmlu"
    for name in ("zero_token_count.png", "diversity.png"):
        assert (tmp_path / "out" / name).stat().st_size > 10_000


def _routing_metrics(coactivation: float, cosine: float, zero: float):
    """8 logged steps whose last quarter (steps 6-8) has these per-layer values (layer 1: twice them);
    the early steps hold a value far off, which the end-of-training average must leave out."""
    def layer(scale, step):
        late = step >= 6
        return {"zero_token_count": scale * zero if late else 9.0, "load_imbalance": 1.0, "flip_rate": 0.1,
                "avg_cosine_similarity": scale * cosine if late else 0.9, "avg_angle_deg": 80.0,
                "spectral_entropy": 2.0 + (0.01 * scale if late else 0.0),
                "partner_coactivation": scale * coactivation if late else 0.9, "partner_coactivation_chance": 0.2}

    return [{"step": step, "tokens": step * 100, "gatepro_active": True, "layers": [layer(1, step), layer(2, step)]}
            for step in range(1, 9)]


def test_routing_differences_with_seed_level_intervals(tmp_path):
    base_coactivation, gp_coactivation = [0.20, 0.21, 0.19], [0.17, 0.185, 0.165]
    runs = {"baseline": [], "gatepro": []}
    for arm, values in (("baseline", base_coactivation), ("gatepro", gp_coactivation)):
        for seed, value in enumerate(values):
            runs[arm].append(_write(tmp_path / f"{arm}{seed}", arm, _outcomes(BASE),
                                    _routing_metrics(value, 0.1 + 0.01 * seed, 2.0 + (arm == "gatepro") * seed)))
    comparison = compare(runs, str(tmp_path / "out"), echo=_quiet, paired_seeds=True)
    (routing,) = comparison["routing"]
    coactivation = routing["vs_baseline"]["partner_coactivation"]
    # the mean over the two layers (values x1 and x2), in points: per seed 1.5 x 100 x (gp - base)
    deltas = [150 * (g - b) for g, b in zip(gp_coactivation, base_coactivation)]
    se = np.std(deltas, ddof=1) / np.sqrt(3)
    overall = coactivation["overall"]
    assert overall["delta"] == pytest.approx(np.mean(deltas))
    assert (overall["ci95_low"], overall["ci95_high"]) == pytest.approx(
        (np.mean(deltas) - stats.t.ppf(0.975, 2) * se, np.mean(deltas) + stats.t.ppf(0.975, 2) * se))
    assert coactivation["layers"][1]["delta"] == pytest.approx(2 * 100 * np.mean(np.subtract(gp_coactivation, base_coactivation)))
    tests = [metric["overall"] for metric in routing["vs_baseline"].values()]
    assert [test["p_adjusted"] for test in tests] == pytest.approx(paired_stats.holm([t["p_value"] for t in tests]))
    assert overall["p_adjusted"] == pytest.approx(4 * overall["p_value"]) and overall["significant"]
    cosine = routing["vs_baseline"]["avg_cosine_similarity"]["overall"]
    assert cosine["zero_spread"] and not cosine["significant"]  # the same cosine in both arms, seed by seed
    spectral = routing["vs_baseline"]["spectral_entropy"]["overall"]
    assert spectral["delta"] == pytest.approx(0.0) and spectral["zero_spread"]
    zero = routing["vs_baseline"]["zero_token_count"]["overall"]
    assert zero["delta"] == pytest.approx(1.5 * 1.0) and not zero["zero_spread"]  # gatepro seeds: +0, +1, +2 experts
    table = (tmp_path / "out" / "table.md").read_text()
    assert "### Routing at the end of training, to the baseline" in table
    assert (f"**gatepro** vs baseline, during training (3 and 3 seeds, paired by seed; mean over layers, seed-level t "
            f"intervals, Holm over the 4 metrics): partner co-activation {overall['delta']:+.3g} points (95% CI") in table
    assert "gate cosine similarity +0 (no interval: seed spread 0), no claim" in table
    assert "| gatepro | partner co-activation (points) | " in table
    two = compare({arm: paths[:2] for arm, paths in runs.items()}, str(tmp_path / "two"), echo=_quiet, paired_seeds=True)
    assert not two["routing"][0]["vs_baseline"]["partner_coactivation"]["overall"]["significant"]
    assert "no claim about the method with fewer than 3 seeds per arm" in (tmp_path / "two" / "table.md").read_text()


def test_a_gatepro_baseline_is_called_out(tmp_path):
    gatepro = {"enabled": True, "penalty": 1e-4, "num_competitors": 1, "hard": False}
    base = _write(tmp_path / "base", "baseline", _outcomes(BASE), gatepro=gatepro)
    other = _write(tmp_path / "gp", "gatepro", _outcomes(BASE))
    compare([base, other], str(tmp_path / "out"), echo=_quiet)
    assert "the baseline **baseline** was evaluated with GatePro routing" in (tmp_path / "out" / "table.md").read_text()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"suite": "olmo-in-loop"}, "different task suites"),
        ({"limit": 50}, "different sample limits"),
        ({"tasks": "drop copa"}, "different tasks"),
    ],
)
def test_refuses_incomparable_results(tmp_path, change, message):
    base = _write(tmp_path / "baseline", "baseline", _outcomes(BASE), samples=False)
    other_path = _write(tmp_path / "gatepro", "gatepro", _outcomes(BASE), samples=False)
    other = json.loads((tmp_path / "gatepro" / "eval_results.json").read_text())
    if change.get("tasks"):
        del other["tasks"]["copa"]
    else:
        other.update(change)
    (tmp_path / "gatepro" / "eval_results.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=message):
        compare([base, other_path], str(tmp_path / "out"), echo=_quiet)
    assert not (tmp_path / "out" / "table.md").exists()


@pytest.mark.parametrize(
    "tasks, message",
    [
        ({}, "tasks must be a non-empty mapping"),
        ([], "tasks must be a non-empty mapping"),
        ({"copa": {"score": "high", "stderr": None, "samples": 3}}, "tasks.copa.score: expected a fraction"),
        ({"copa": {"score": None, "stderr": None, "samples": 3}}, "tasks.copa.score: expected a fraction"),
        ({"copa": {"score": 0.5, "stderr": None, "samples": 0}}, "tasks.copa.samples"),
        ({"copa": {"score": 0.5, "stderr": None}}, "tasks.copa: missing samples"),
        ({"trivia": {"score": 0.5, "stderr": None, "samples": 2}}, "unknown task"),
    ],
)
def test_bad_result_content_is_named(tmp_path, tasks, message, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": SCHEMA, "label": "x", "suite": "lm-eval", "tasks": tasks}))
    with pytest.raises(ValueError, match=message):
        load_result(str(bad))
    good = _write(tmp_path / "good", "good", _outcomes(BASE))
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", good, str(bad), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "bad.json" in capsys.readouterr().err


def test_bad_result_files_are_named(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.json, line 1, column 2: not valid JSON \(Expecting property name"):
        load_result(str(bad))
    bad.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match="neither an olmoe-gatepro result .* nor an lm-eval results file"):
        load_result(str(bad))
    with pytest.raises(SystemExit):
        main(["compare", str(bad)])
    assert "two or more results" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--group", "baseline"], "expected LABEL=RUN"),
    (["a", "b", "--seed-sd", "copa"], "--seed-sd 'copa': expected COLUMN=POINTS"),
    (["a", "b", "--seed-sd", "copa=-1"], "POINTS a number > 0"),
    (["a", "b", "--seed-sd", "copa=1", "--seed-sd", "copa=2"], "copa is given twice"),
    (["--group", "a=x", "--group", "a=y"], "given twice"),
    (["runs/a", "--group", "a=x"], "not both"),
])
def test_bad_group_flags(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# lm-eval's own output, laid out as EvaluationTracker writes it (lm_eval 0.4.13: save_results_aggregated,
# save_results_samples), as a real `lm_eval --log_samples` run of the offline tasks was seen to write it:
# OUT/<model>/results_<date>.json and samples_<task>_<date>.jsonl per task, MMLU as a group of subtasks.
STOCK_METRIC = {"mmlu": "acc", "copa": "acc", "hellaswag": "acc_norm", "arc_challenge": "acc_norm", "piqa": "acc_norm"}
MMLU_SUBJECTS = ("abstract_algebra", "anatomy")  # 100 items each


def _mmlu_id(task, i):
    return f"{MMLU_SUBJECTS[i // 100]}/{i % 100}" if task == "mmlu" else str(i)


def _stock_sample(task, doc_id, i, correct):
    """One logged multiple-choice sample whose log-likelihoods give ``_margin(i, correct)`` under the metric."""
    count = 4 if task == "mmlu" else 2
    choices = [f" ans{j}" if task == "copa" else f"ans{j}" for j in range(count)]  # COPA's choices carry their space
    scale = len(choices[0]) if STOCK_METRIC[task] == "acc_norm" else 1  # acc_norm divides by the choice's length
    lls = [-2.0 * scale] * count
    lls[0] = -2.0 * scale + _margin(i, correct) * scale  # the right choice is the first
    return {"doc_id": doc_id, "doc": {"id": doc_id}, "target": choices[0] if task == "copa" else "0",
            "arguments": {f"gen_args_{j}": {"arg_0": "question", "arg_1": " " + choice} for j, choice in enumerate(choices)},
            "resps": [[[repr(ll), "False"]] for ll in lls], "filtered_resps": [[repr(ll), "False"] for ll in lls],
            "filter": "none", "metrics": [STOCK_METRIC[task]], "doc_hash": "x", "prompt_hash": "x", "target_hash": "x",
            STOCK_METRIC[task]: 1.0 if correct else 0.0}


def _write_stock(out, model, outcomes, date="2026-01-02T03-04-05.678901"):
    """lm-eval's output folder for ``model`` with these outcomes; returns OUT (the results file is a folder down)."""
    folder = out / model.replace("/", "__")
    folder.mkdir(parents=True)
    leaves = {task: [f"mmlu_{s}" for s in MMLU_SUBJECTS] if task == "mmlu" else [task] for task in outcomes}
    results, samples = {}, {}
    for task, values in outcomes.items():
        p = sum(values) / len(values)
        results[task] = {"alias": task, f"{STOCK_METRIC[task]},none": p,
                         f"{STOCK_METRIC[task]}_stderr,none": (p * (1 - p) / (len(values) - 1)) ** 0.5}
        for number, leaf in enumerate(leaves[task]):
            part = values[100 * number: 100 * (number + 1)] if task == "mmlu" else values
            offset = 100 * number if task == "mmlu" else 0
            samples[leaf] = [_stock_sample(task, doc, offset + doc, correct) for doc, correct in enumerate(part)]
    data = {"results": results, "groups": {"mmlu": results["mmlu"]},
            "group_subtasks": {"mmlu": ["mmlu_stem"], "mmlu_stem": leaves["mmlu"],
                               **{task: [] for task in outcomes if task != "mmlu"}},
            "configs": {leaf: {"task": leaf, "target_delimiter": " "} for leaf in samples},
            "n-samples": {leaf: {"original": len(rows), "effective": len(rows)} for leaf, rows in samples.items()},
            "config": {"model": "hf", "model_args": f"pretrained={model}", "limit": None},
            "model_name": model, "model_name_sanitized": model.replace("/", "__"), "lm_eval_version": "0.4.13"}
    (folder / f"results_{date}.json").write_text(json.dumps(data, indent=2))
    for leaf, rows in samples.items():
        (folder / f"samples_{leaf}_{date}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(out)


def _without_names(comparison):
    return [{key: value for key, value in row.items() if key not in ("label", "runs")} for row in comparison["rows"]]


def test_stock_lm_eval_output_gives_the_same_table_as_our_own_files(tmp_path):
    changed = _with({"copa": ([1, 3, 5, 7, 9, 11, 13], [0]), "mmlu": ([1, 3, 151], [])})
    own = [_write(tmp_path / name, name, outcomes, item_id=_mmlu_id, margins=True)
           for name, outcomes in (("baseline", _outcomes(BASE)), ("gatepro", changed))]
    stock = [_write_stock(tmp_path / f"lm-eval-{name}", f"models/{name}", outcomes)
             for name, outcomes in (("baseline", _outcomes(BASE)), ("gatepro", changed))]
    result = load_result(stock[0])
    assert result["label"] == "baseline" and result["suite"] == "lm-eval" and result["tasks"]["mmlu"]["samples"] == 200
    ours = compare(own, str(tmp_path / "own"), echo=_quiet)
    theirs = compare(stock, str(tmp_path / "stock"), echo=_quiet)
    mixed = compare([stock[0], own[1]], str(tmp_path / "mixed"), echo=_quiet)
    assert _without_names(theirs) == _without_names(ours) == _without_names(mixed)
    assert theirs["rows"][1]["columns"]["copa"]["delta"] == pytest.approx(6.0) and theirs["rows"][1]["paired"]
    assert "| gatepro |" in (tmp_path / "stock" / "table.md").read_text()  # labelled by the model's folder name


def test_stock_lm_eval_folders_are_never_guessed(tmp_path):
    out = tmp_path / "lm-eval"
    _write_stock(out, "m", _outcomes(BASE))
    _write_stock(tmp_path / "second", "m", _with({"copa": ([1], [])}), date="2026-02-02T00-00-00.000000")
    for name in os.listdir(tmp_path / "second" / "m"):  # a second run of the same model, into the same folder
        shutil.move(tmp_path / "second" / "m" / name, out / "m" / name)
    with pytest.raises(ValueError, match="holds 2 lm-eval results files"):
        load_result(str(out))
    first, later = sorted((out / "m").glob("results_*.json"))
    assert load_result(str(later))["_lm_eval"]["date"] == "2026-02-02T00-00-00.000000"
    comparison = compare([str(first), str(later)], str(tmp_path / "cmp"), echo=_quiet)  # each file with its samples
    assert comparison["rows"][1]["columns"]["copa"]["delta"] == pytest.approx(1.0)
    next((out / "m").glob("samples_copa_2026-02-02*.jsonl")).unlink()
    with pytest.raises(ValueError, match=r"samples files missing for \['copa'\]"):  # not half-read
        compare([str(first), str(later)], str(tmp_path / "cmp"), echo=_quiet)
    broken = json.loads(later.read_text())
    broken["results"]["copa"].pop("acc,none")
    later.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="results.copa has no 'acc' score"):
        load_result(str(later))
