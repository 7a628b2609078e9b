import csv
import json

import pytest

from olmoe_gatepro.cli import main
from olmoe_gatepro.compare import SCHEMA, comparison_rows, compare, load_result

PAPER = {  # the GatePro paper's OLMoE table (Table 2), as fractions; stderrs made up for the test
    "baseline": {"mmlu": 0.376, "hellaswag": 0.690, "arc_challenge": 0.3946, "piqa": 0.7687, "copa": 0.860},
    "gatepro": {"mmlu": 0.383, "hellaswag": 0.694, "arc_challenge": 0.4057, "piqa": 0.7769, "copa": 0.867},
}
STDERR = {"mmlu": 0.004, "hellaswag": 0.0046, "arc_challenge": 0.0143, "piqa": 0.0098, "copa": 0.0349}


def _result(label, scores, suite="lm-eval", limit=None, stderr=STDERR):
    return {
        "schema": SCHEMA, "label": label, "model": f"runs/{label}", "revision": None, "suite": suite,
        "limit": limit, "gatepro": None,
        "tasks": {task: {"score": s, "stderr": stderr[task], "samples": 100, "metric": "acc"} for task, s in scores.items()},
    }


def _write(folder, result, metrics=None):
    folder.mkdir(parents=True)
    (folder / "eval_results.json").write_text(json.dumps(result))
    if metrics:
        (folder / "gatepro_metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return str(folder)


def test_table_deltas_and_significance(tmp_path):
    results = [load_result(_write(tmp_path / n, _result(n, PAPER[n]))) for n in ("baseline", "gatepro")]
    tasks, rows = comparison_rows(results)
    assert tasks == sorted(PAPER["baseline"])
    gatepro = rows[1]
    assert gatepro["deltas"]["mmlu"] == pytest.approx(0.7)
    assert gatepro["deltas"]["avg"] == pytest.approx((0.7 + 0.4 + 1.11 + 0.82 + 0.7) / 5)
    # MMLU: 0.7 > hypot(0.4, 0.4) = 0.57 -> exceeds; COPA: 0.7 < hypot(3.49, 3.49) -> does not.
    assert gatepro["significant"]["mmlu"] and not gatepro["significant"]["copa"]
    assert not any(rows[0]["significant"].values())
    assert rows[0]["scores"]["avg"] == pytest.approx(sum(PAPER["baseline"].values()) * 20)


def test_compare_writes_markdown_csv_and_plots(tmp_path):
    metrics = lambda offset: [  # noqa: E731
        {"step": step, "tokens": step * 100, "gatepro_active": True, "layers": [
            {"zero_token_count": max(0, 10 - step - offset), "load_imbalance": 2.0, "flip_rate": 0.01,
             "avg_cosine_similarity": 0.2, "avg_angle_deg": 80.0, "spectral_entropy": 3.0}] * 2}
        for step in range(1, 6)
    ]
    paths = [_write(tmp_path / n, _result(n, PAPER[n]), metrics(i)) for i, n in enumerate(("baseline", "gatepro"))]
    out = tmp_path / "report"
    assert main(["compare", *paths, "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert "| gatepro |" in table and "38.30 ± 0.40 (Δ +0.70*)" in table
    rows = list(csv.DictReader((out / "table.csv").open()))
    assert len(rows) == 12 and {r["column"] for r in rows} >= {"avg", "mmlu"}
    for name in ("zero_token_count.png", "diversity.png"):
        assert (out / name).stat().st_size > 10_000


@pytest.mark.parametrize(
    "change, message",
    [
        ({"suite": "olmo-in-loop"}, "different task suites"),
        ({"limit": 50}, "different sample limits"),
        ({"tasks": "drop copa"}, "different tasks"),
    ],
)
def test_refuses_incomparable_results(tmp_path, change, message):
    base = _write(tmp_path / "baseline", _result("baseline", PAPER["baseline"]))
    other = _result("gatepro", PAPER["gatepro"])
    if change.get("tasks"):
        del other["tasks"]["copa"]
    else:
        other.update(change)
    other_path = _write(tmp_path / "gatepro", other)
    with pytest.raises(ValueError, match=message):
        compare([base, other_path], str(tmp_path / "out"), echo=lambda _: None)
    assert not (tmp_path / "out" / "table.md").exists()


def test_bad_result_files_are_named(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_result(str(bad))
    bad.write_text(json.dumps({"schema": "other"}))
    with pytest.raises(ValueError, match="not an olmoe-gatepro result"):
        load_result(str(bad))
    with pytest.raises(SystemExit):
        main(["compare", str(bad)])
    assert "two or more results" in capsys.readouterr().err


def test_missing_stderr_shows_na_and_marks_nothing(tmp_path):
    no_stderr = {task: None for task in STDERR}
    results = [load_result(_write(tmp_path / n, _result(n, PAPER[n], stderr=no_stderr))) for n in ("baseline", "gatepro")]
    tasks, rows = comparison_rows(results)
    assert not any(rows[1]["significant"].values())
    from olmoe_gatepro.compare import to_markdown

    assert "38.30 ± n/a (Δ +0.70)" in to_markdown(tasks, rows, "lm-eval", None)
