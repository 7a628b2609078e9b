import csv
import json

from olmoe_gatepro import cli
from olmoe_gatepro.pipelines.presets import STUDY_PRESETS as PRESETS
from olmoe_gatepro.pipelines.study import SUMMARY_COLUMNS, activation_step, run_study


def test_minimal_study_writes_the_report_and_is_deterministic(tmp_path):
    first = run_study(PRESETS["minimal"], str(tmp_path / "a"), echo=lambda _: None)
    assert cli.main(["study", "--preset", "minimal", "--out", str(tmp_path / "b")]) == 0
    for name in ("records.jsonl", "summary.csv", "summary.md", "preset.json", "zero_token_count.png", "diversity.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0, name
    with open(tmp_path / "a" / "summary.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["setting"] for row in rows] == ["off", "lambda=0.1"]
    for column in SUMMARY_COLUMNS:
        assert f"{column}_mean" in rows[0] and f"{column}_std" in rows[0]
    assert float(rows[1]["flip_rate_mean"]) > 0
    second = [json.loads(line) for line in (tmp_path / "b" / "records.jsonl").read_text().splitlines()]
    assert [r["records"] for r in first] == [r["records"] for r in second]


def test_interrupted_study_resumes_without_rerunning_finished_runs(tmp_path):
    out = tmp_path / "study"
    run_study(PRESETS["minimal"], str(out), echo=lambda _: None)
    lines = (out / "records.jsonl").read_text().splitlines()
    (out / "records.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # crash mid-line
    printed = []
    run_study(PRESETS["minimal"], str(out), echo=printed.append)
    assert [line for line in printed if line.startswith("[")] == [printed[0]] and "lambda=0.1" in printed[0]
    resumed = (out / "records.jsonl").read_text().splitlines()
    assert resumed[0] == lines[0] and json.loads(resumed[-1])["key"] == json.loads(lines[1])["key"]


def test_activation_step():
    layer = lambda zero: {"zero_token_count": zero}  # noqa: E731
    records = [{"step": 10, "layers": [layer(3), layer(0)]}, {"step": 20, "layers": [layer(0), layer(0)]}]
    assert activation_step(records) == 20
    assert activation_step(records[:1]) is None


def test_gpu_preset_refuses_without_cuda(capsys):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the refusal path does not apply")
    with pytest.raises(SystemExit):
        cli.main(["study", "--preset", "gpu"])
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_stdlib_corpus_is_large_and_bytes():
    from olmoe_gatepro.pipelines.tiny_run import corpus_tokens

    tokens = corpus_tokens("stdlib")
    assert tokens.numel() > 5_000_000 and int(tokens.max()) < 256
