import csv
import json
import shutil

import pytest

from olmoe_gatepro.cli import main
from olmoe_gatepro.evaluation.compare import compare
from olmoe_gatepro.evaluation.results import SCHEMA, load_result

TASK_ITEMS = {"mmlu": 200, "hellaswag": 100, "arc_challenge": 100, "piqa": 100, "copa": 100}


def _outcomes(correct: dict[str, set[int]]) -> dict[str, list[bool]]:
    return {task: [i in correct.get(task, set()) for i in range(n)] for task, n in TASK_ITEMS.items()}


def _write(folder, label, outcomes, metrics=None, samples=True, gatepro=None, stderr=True):
    """A run folder whose result and per-item file agree (scores are the items' accuracy)."""
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
        lines = [json.dumps({"task": t, "item": str(i), "correct": c}) for t, v in outcomes.items() for i, c in enumerate(v)]
        (folder / "samples.lm-eval.jsonl").write_text("\n".join(lines) + "\n")
    if metrics:
        (folder / "gatepro_metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return str(folder)


BASE = {task: set(range(0, n, 2)) for task, n in TASK_ITEMS.items()}  # 50% on every task


def _with(changes):
    """BASE with items added to (positive) or removed from (negative) the correct sets."""
    correct = {task: set(items) for task, items in BASE.items()}
    for task, (won, lost) in changes.items():
        correct[task] |= set(won)
        correct[task] -= set(lost)
    return _outcomes(correct)


def _quiet(_):
    pass


def test_copa_mcnemar_and_ci_in_comparison_json(tmp_path):
    base = _write(tmp_path / "base", "baseline", _outcomes(BASE))
    # COPA: the model wins 9 items the baseline lost and loses 1 it won: exact McNemar p = 22/1024
    other = _write(tmp_path / "gp", "gatepro", _with({"copa": ([1, 3, 5, 7, 9, 11, 13, 15, 17], [0])}))
    comparison = compare([base, other], str(tmp_path / "out"), echo=_quiet)
    copa = comparison["rows"][1]["columns"]["copa"]
    assert copa["delta"] == pytest.approx(8.0) and copa["p_value"] == pytest.approx(22 / 1024)
    assert copa["ci95_low"] < 8.0 < copa["ci95_high"] and copa["n"] == 100 and copa["significant"]
    assert comparison["rows"][1]["columns"]["mmlu"]["p_value"] == 1.0
    written = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert {"delta", "ci95_low", "ci95_high", "p_value", "n"} <= set(written["rows"][1]["columns"]["copa"])
    assert written["method"]["ci95"].startswith("percentile interval of a paired bootstrap over items, 10000")
    table = (tmp_path / "out" / "table.md").read_text()
    assert table.index("## Verdict") < table.index("| model |")
    assert "**gatepro** vs baseline: better on COPA by 8.00 points (95% CI" in table
    assert "| model | MMLU | HellaSwag | ARC-Challenge | PIQA | COPA | average |" in table  # the paper's order
    assert "(Δ +8.00* [" in table and "* marks an effect: p < 0.05" in table
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
    assert "**same** vs baseline: no difference detectable at this sample size on MMLU" in (
        tmp_path / "out" / "table.md").read_text()


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


def test_groups_of_seeds_report_seed_spread_and_noise(tmp_path):
    b0 = _write(tmp_path / "b0", "b", _outcomes(BASE))
    b1 = _write(tmp_path / "b1", "b", _with({"piqa": (range(1, 21, 2), [])}))  # another seed: +10 on PIQA
    g0 = _write(tmp_path / "g0", "g", _with({"piqa": (range(1, 41, 2), [])}))  # +20
    g1 = _write(tmp_path / "g1", "g", _with({"piqa": (range(1, 61, 2), [])}))  # +30
    assert main(["compare", "--group", f"baseline={b0},{b1}", "--group", f"gatepro={g0},{g1}",
                 "--out", str(tmp_path / "out")]) == 0
    comparison = json.loads((tmp_path / "out" / "comparison.json").read_text())
    base, gatepro = comparison["rows"]
    assert base["label"] == "baseline" and len(gatepro["runs"]) == 2
    assert base["columns"]["piqa"]["score"] == pytest.approx(55.0)
    assert base["columns"]["piqa"]["seed_sd"] == pytest.approx(7.0710678)  # stdev(50, 60)
    piqa = gatepro["columns"]["piqa"]
    assert piqa["delta"] == pytest.approx(20.0) and piqa["seed_spread"] == pytest.approx(50 ** 0.5)  # sqrt(50/2 + 50/2)
    assert piqa["p_value"] < 0.05 and piqa["significant"]  # 20 > 1.96 x 7.07
    assert gatepro["columns"]["copa"]["seed_spread"] == 0.0
    table = (tmp_path / "out" / "table.md").read_text()
    assert "55.00 ± 7.07 sd (2 seeds)" in table and "better on PIQA by 20.00 points" in table


def test_an_item_level_effect_within_seed_noise_is_not_called_an_effect(tmp_path):
    b0 = _write(tmp_path / "b0", "b", _outcomes(BASE))
    b1 = _write(tmp_path / "b1", "b", _with({"piqa": (range(1, 61, 2), [])}))  # seeds 30 points apart
    g0 = _write(tmp_path / "g0", "g", _with({"piqa": (range(1, 41, 2), [])}))
    g1 = _write(tmp_path / "g1", "g", _with({"piqa": (range(1, 61, 2), [])}))
    comparison = compare({"baseline": [b0, b1], "gatepro": [g0, g1]}, str(tmp_path / "out"), echo=_quiet)
    piqa = comparison["rows"][1]["columns"]["piqa"]
    assert piqa["p_value"] < 0.05 and not piqa["significant"]  # 10 points < 1.96 x sqrt(450/2 + 50/2)
    assert "within run-to-run noise on PIQA" in (tmp_path / "out" / "table.md").read_text()


def test_results_without_items_fall_back_to_unpaired_standard_errors(tmp_path):
    base = _write(tmp_path / "base", "baseline", _outcomes(BASE), samples=False)
    other = _write(tmp_path / "gp", "gatepro", _with({"copa": (range(1, 21, 2), [])}), samples=False)
    comparison = compare([base, other], str(tmp_path / "out"), echo=_quiet)
    copa = comparison["rows"][1]["columns"]["copa"]
    assert not comparison["rows"][1]["paired"] and copa["test"] == "unpaired z (no per-item results)"
    assert copa["delta"] == pytest.approx(10.0)
    assert "Unpaired: per-item results are missing" in (tmp_path / "out" / "table.md").read_text()


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
    assert len(rows) == 12 and rows[0]["column"] == "mmlu"
    for name in ("zero_token_count.png", "diversity.png"):
        assert (tmp_path / "out" / name).stat().st_size > 10_000


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
    with pytest.raises(ValueError, match="not an olmoe-gatepro result"):
        load_result(str(bad))
    with pytest.raises(SystemExit):
        main(["compare", str(bad)])
    assert "two or more results" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--group", "baseline"], "expected LABEL=RUN"),
    (["--group", "a=x", "--group", "a=y"], "given twice"),
    (["runs/a", "--group", "a=x"], "not both"),
])
def test_bad_group_flags(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
