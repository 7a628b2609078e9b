"""OLMo-core end to end on the CPU: train baseline and GatePro with scripts/train.py, resume, convert, load.

OLMo-core's MoE runs on the CPU here (``olmo_core/cpu.py``), so the runs are tiny:
2 sequences of 16 tokens a step. The GatePro run switches GatePro on and off mid-run (the
hot-swap schedule); killed between the two switches (SIGKILL, a pre-emption), stopped by Ctrl-C,
or stopped by a STOP file (``olmo_core.stop``, what the SLURM scripts do before a time limit) and
started again, it must end exactly where an uninterrupted run ends.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoint_state import assert_same_state, checkpoint_state
from interrupting import interrupt_once

from olmoe_gatepro.checkpoints import complete_steps
from olmoe_gatepro.cli import main
from olmoe_gatepro.jsonl import read_records
from olmoe_gatepro.olmo_core.conformance import kill_after_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TOKENS_PER_STEP = 2 * 16
SMALL = ["--train.sequence_length=16", "--train.global_batch_sequences=2", "--train.micro_batch_sequences=2",
         "--train.checkpoint_interval_steps=2", "--train.metrics_interval_steps=1", "--optim.warmup_tokens=32"]
SCHEDULE = [f"--gatepro.on_from_tokens={2 * TOKENS_PER_STEP}", f"--gatepro.off_after_tokens={5 * TOKENS_PER_STEP}"]


def _command(folder: Path, tokens: Path, steps: int, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts/train.py"), str(ROOT / "configs/tiny.yaml"),
            f"--train.save_folder={folder}", f"--data.paths=[{tokens}/*.npy]",
            f"--train.max_tokens={steps * TOKENS_PER_STEP}", *SMALL, *overrides]


def _train(folder: Path, tokens: Path, steps: int, *overrides: str, expect: int = 0) -> str:
    result = subprocess.run(_command(folder, tokens, steps, *overrides), capture_output=True, text=True, timeout=900)
    assert result.returncode == expect, result.stderr[-4000:]
    return result.stderr + result.stdout


def _train_until_killed(folder: Path, tokens: Path, steps: int, kill_at_step: int, *overrides: str) -> None:
    """Start a run and SIGKILL it once its checkpoint of ``kill_at_step`` is complete (a pre-emption)."""
    kill_after_checkpoint(_command(folder, tokens, steps, *overrides), str(folder), kill_at_step)


def _convert(folder: Path, out: Path, validate: bool = True) -> dict[str, torch.Tensor]:
    assert main(["convert", str(folder), "--out", str(out), *([] if validate else ["--no-validate"])]) == 0
    return load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    text = root / "text.txt"
    text.write_text(" ".join(f"word{i % 37} of line {i}." for i in range(4000)))
    assert main(["prepare-data", str(text), "--out", str(root / "tokens")]) == 0
    tokens = root / "tokens"
    _train_until_killed(root / "resumed", tokens, 6, 4, *SCHEDULE)
    first_step = root / "interrupted" / "gatepro_metrics.jsonl"
    code, output, seconds = interrupt_once(_command(root / "interrupted", tokens, 6, *SCHEDULE), first_step.exists,
                                           root / "interrupted.log", env=dict(os.environ))
    stopped = root / "stopped"
    stopped.mkdir()
    (stopped / "STOP").touch()
    stop = {"first": _train(stopped, tokens, 6, *SCHEDULE, expect=1)}  # stopped before its end: not a success
    stop.update(at=complete_steps(str(stopped)), done=(stopped / "train.done").exists())
    (stopped / "STOP").unlink()
    logs = {
        "stop": stop,
        "stopped": _train(stopped, tokens, 6, *SCHEDULE),
        "straight": _train(root / "straight", tokens, 6, *SCHEDULE),
        "resumed": _train(root / "resumed", tokens, 6, *SCHEDULE),
        "interrupted": _train(root / "interrupted", tokens, 6, *SCHEDULE),
        "baseline": _train(root / "baseline", tokens, 6, "--gatepro.enabled=false"),
        "sigint": (code, output, seconds),
    }
    weights = {name: _convert(root / name, root / f"hf-{name}", validate=name != "interrupted")
               for name in ("straight", "resumed", "interrupted", "baseline")}
    return root, logs, weights


def test_ctrl_c_stops_at_the_next_step_with_a_checkpoint_and_a_rerun_ends_where_an_uninterrupted_run_does(runs):
    root, logs, weights = runs
    code, output, seconds = logs["sigint"]
    assert code == 130 and "Traceback" not in output, output[-3000:]
    step = int(output.split("stopped at step ")[1].split()[0])
    assert 1 <= step < 6 and f"Loading checkpoint from '{root}/interrupted/step{step}'" in logs["interrupted"]
    assert "SIGINT: stopped at step" in output and seconds < 60  # not at OLMo-core's 25-step check
    for key, tensor in weights["straight"].items():
        torch.testing.assert_close(weights["interrupted"][key], tensor, rtol=0, atol=0, msg=key)


def test_the_stop_file_stops_after_a_checkpoint_and_the_rerun_ends_where_an_uninterrupted_run_does(runs):
    root, logs, _ = runs
    stop = logs["stop"]
    assert stop["at"] and stop["at"][-1] < 6 and not stop["done"]
    assert f"the run was cancelled: stopped at step {stop['at'][-1]} with a checkpoint in {root}/stopped" in stop["first"]
    assert "STOP exists: stopping at the next cancel check" in stop["first"]
    assert f"Loading checkpoint from '{root}/stopped/step{stop['at'][-1]}'" in logs["stopped"]
    for name in ("straight", "stopped"):
        assert json.loads((root / name / "train.done").read_text()) == {"step": 6, "tokens": 6 * TOKENS_PER_STEP}
    assert_same_state(checkpoint_state(root / "straight/step6"), checkpoint_state(root / "stopped/step6"))


def test_rerun_of_a_finished_or_other_run_and_missing_data(runs, tmp_path, capsys):
    from test_bad_inputs import _refused, _snapshot

    root, _, _ = runs
    tokens = root / "tokens"
    finished = _command(root / "straight", tokens, 6, *SCHEDULE)[2:]
    before = _snapshot(root / "straight")
    assert main(["train", *finished]) == 0
    assert f"{root / 'straight'}: finished, step 6 of 6; nothing to train" in capsys.readouterr().out
    line = _refused(["train", *finished, "--optim.lr=1e-3", "--evaluation.interval_steps=3"], capsys,
                    f"train.save_folder {root / 'straight'} holds a run with other settings: optim.lr: 0.0004 there, "
                    "0.001 now; rerun")
    assert "interval_steps:" not in line  # evaluation settings may change on a rerun
    assert _snapshot(root / "straight") == before
    nowhere = _command(tmp_path / "run", tmp_path / "nowhere", 6)[2:]
    for dry_run in ([], ["--dry-run"]):
        _refused(["train", *nowhere, *dry_run], capsys, f"data.paths: '{tmp_path / 'nowhere'}/*.npy' matches no file")
    assert not (tmp_path / "run").exists()


def test_resumed_gatepro_run_ends_exactly_where_an_uninterrupted_one_does(runs):
    root, logs, weights = runs
    assert f"Loading checkpoint from '{root}/resumed/step4'" in logs["resumed"]
    assert "Loading checkpoint from" not in logs["straight"]
    straight, resumed = weights["straight"], weights["resumed"]
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
    records = read_records(str(root / "straight/gatepro_metrics.jsonl"))
    assert [record["step"] for record in records] == [1, 2, 3, 4, 5, 6]
    # on from 64 tokens (the step that starts there is step 3), off from 160 (step 6)
    assert [record["gatepro_active"] for record in records] == [False, False, True, True, True, False]
    assert read_records(str(root / "resumed/gatepro_metrics.jsonl")) == records


def test_baseline_and_gatepro_checkpoints_load_in_stock_transformers(runs):
    root, _, weights = runs
    baseline, gatepro = weights["baseline"], weights["straight"]
    assert any(not torch.equal(baseline[key], gatepro[key]) for key in baseline)
    assert not any(record["gatepro_active"] for record in read_records(str(root / "baseline/gatepro_metrics.jsonl")))
    # A fresh interpreter that never imports olmoe_gatepro: stock transformers only.
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True)\n"
        "assert type(model).__name__ == 'OlmoeForCausalLM', type(model)\n"
        "assert not any(info.values()), info\n"
        "ids = AutoTokenizer.from_pretrained(sys.argv[1])('word3 of line', return_tensors='pt').input_ids\n"
        "out = model.generate(ids, max_new_tokens=4, do_sample=False)\n"
        "assert out.shape == (1, ids.shape[1] + 4) and 'olmoe_gatepro' not in sys.modules\n"
        "print('ok')\n"
    )
    for name in ("hf-baseline", "hf-straight"):
        result = subprocess.run([sys.executable, "-c", script, str(root / name)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    provenance = json.loads((root / "hf-baseline/olmoe_gatepro.json").read_text())
    assert provenance["step"] == 6 and provenance["gatepro_in_training"]["enabled"] is False


def test_every_recorded_metric_lands_in_the_metrics_file(runs):
    root, _, _ = runs

    def losses(name):
        lines = read_records(str(root / name / "metrics.jsonl"))
        steps = [line["step"] for line in lines]
        assert steps == sorted(steps)  # one line per logging event, in order
        return [(line["step"], line["train/CE loss"]) for line in lines if "train/CE loss" in line], lines

    straight, lines = losses("straight")
    resumed, _ = losses("resumed")  # killed after its step-4 checkpoint, then resumed
    assert [step for step, _ in straight] == [1, 2, 3, 4, 5, 6]
    assert resumed == straight  # the killed run's lines after step 4 were dropped, the rerun's appended
    assert any("gatepro/layer 00/partner_coactivation" in line for line in lines)
    assert any(name.startswith("throughput/") for line in lines for name in line)  # OLMo-core's speed monitor
    resolved = json.loads((root / "straight/olmo_core_config.json").read_text())
    assert {"run", "model", "train_module", "dataset", "data_loader", "trainer"} <= set(resolved)
    assert resolved["run"]["train"]["save_folder"] == str(root / "straight")


def test_inspect_of_a_run_folder_on_the_cpu_without_triton_interpret_set(runs, tmp_path):
    """Inspect runs OLMo-core's MoE on the CPU whatever the Trainer's imports loaded first (it crashed once
    with "Cannot call @triton.jit'd outside of the scope of a kernel", when the CPU path was Triton's interpreter)."""
    root, _, _ = runs
    if torch.cuda.is_available():
        pytest.skip("with CUDA the compiled kernels run")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "olmoe_gatepro.cli", "inspect", str(root / "straight"), "--max-tokens",
                             "64", "--out", str(tmp_path / "routing")], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "routing" / "routing.json").read_text())["models"][0]["tokens"] == 64
