"""GateProTrainerCallback under transformers.Trainer: schedule, metrics, exact resume, two processes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from olmoe_gatepro import unpatch
from olmoe_gatepro.core.config import GateProRunConfig
from olmoe_gatepro.jsonl import read_records
from trainer_run import TOKENS_PER_STEP, train

HERE = Path(__file__).resolve().parents[1]  # tests/, where trainer_run.py lives


@pytest.fixture(autouse=True)
def always_unpatch():
    unpatch()
    yield
    unpatch()


def test_schedule_in_tokens_metrics_and_trainer_logging(tmp_path):
    gatepro = GateProRunConfig(enabled=True, penalty=0.05, on_from_tokens=2 * TOKENS_PER_STEP,
                               off_after_tokens=4 * TOKENS_PER_STEP)
    trainer = train(str(tmp_path), gatepro, steps=6)
    lines = read_records(tmp_path / "gatepro_metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    # Step s starts after (s - 1) steps' tokens: on for steps 3 and 4.
    assert [line["gatepro_active"] for line in lines] == [False, False, True, True, False, False]
    for line in lines:
        assert line["tokens"] == line["step"] * TOKENS_PER_STEP
        for layer in line["layers"]:
            assert layer["routed_tokens"] == TOKENS_PER_STEP  # every micro-batch of the step
            assert 0 <= layer["partner_coactivation"] <= 1 and layer["partner_coactivation_chance"] == 1 / 7
    assert any(layer["flip_rate"] > 0 for line in lines for layer in line["layers"])
    logged = [entry for entry in trainer.state.log_history if "gatepro/layer_01/flip_rate" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4, 5, 6]
    assert [entry["gatepro/layer_01/flip_rate"] for entry in logged] == [line["layers"][1]["flip_rate"] for line in lines]


def test_resumed_run_follows_the_schedule_of_an_uninterrupted_one(tmp_path):
    gatepro = GateProRunConfig(enabled=True, penalty=0.05, on_from_steps=4)  # switches on after the checkpoint
    train(str(tmp_path / "whole"), gatepro, steps=6)
    unpatch()
    train(str(tmp_path / "cut"), gatepro, steps=6, stop_at=3)
    with open(tmp_path / "cut" / "gatepro_metrics.jsonl", "a") as file:
        file.write('{"step": 4, "cut sh')  # a line a crash cut short
    unpatch()
    train(str(tmp_path / "cut"), gatepro, steps=6, resume=True)
    whole = read_records(tmp_path / "whole" / "gatepro_metrics.jsonl")
    resumed = read_records(tmp_path / "cut" / "gatepro_metrics.jsonl")
    assert [(r["step"], r["tokens"], r["gatepro_active"]) for r in resumed] == [
        (r["step"], r["tokens"], r["gatepro_active"]) for r in whole]
    assert [line["gatepro_active"] for line in whole] == [False] * 4 + [True] * 2
    assert resumed[:3] == whole[:3]  # the lines before the checkpoint are kept as written
    assert resumed == whole  # and the steps after it, metrics included, bit for bit


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    """Every tensor, experts included (fused in memory, per expert in the Trainer's checkpoints)."""
    gatepro = GateProRunConfig(enabled=True, penalty=0.05, on_from_steps=4)
    whole = train(str(tmp_path / "whole"), gatepro, steps=6).model.state_dict()
    unpatch()
    train(str(tmp_path / "cut"), gatepro, steps=6, stop_at=3)
    unpatch()
    resumed = train(str(tmp_path / "cut"), gatepro, steps=6, resume=True).model.state_dict()
    assert resumed.keys() == whole.keys() and any("experts.gate_up_proj" in key for key in whole)
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("damage", ["drop an expert", "add a key", "reshape a key"])
def test_resuming_a_checkpoint_that_does_not_fit_the_model_fails_loudly(tmp_path, damage):
    from safetensors.torch import load_file, save_file

    gatepro = GateProRunConfig(enabled=True, penalty=0.05)
    train(str(tmp_path), gatepro, steps=3)
    unpatch()
    path = tmp_path / "checkpoint-3" / "model.safetensors"
    tensors = load_file(path)
    key = "model.layers.1.mlp.experts.5.up_proj.weight"
    if damage == "drop an expert":
        del tensors[key]
    elif damage == "add a key":
        tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    else:
        tensors[key] = tensors[key][:-1]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"checkpoint {tmp_path / 'checkpoint-3'} does not hold exactly the weights"):
        train(str(tmp_path), gatepro, steps=6, resume=True)


def test_tokens_schedule_needs_token_counting(tmp_path):
    from transformers import Trainer, TrainingArguments

    from olmoe_gatepro.transformers.trainer_callback import GateProTrainerCallback
    from trainer_run import dataset
    from olmoe_gatepro.pipelines.presets import TinyRunConfig
    from olmoe_gatepro.pipelines.tiny_run import build_tiny_olmoe

    trainer = Trainer(model=build_tiny_olmoe(TinyRunConfig(n_layers=1)), train_dataset=dataset(4),
                      args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    with pytest.raises(ValueError, match="include_num_input_tokens_seen"):
        GateProTrainerCallback.attach(trainer, GateProRunConfig(enabled=True, on_from_tokens=10))
    with pytest.raises(ValueError, match="metrics_interval_steps must be an int >= 1"):
        GateProTrainerCallback(trainer, GateProRunConfig(), metrics_interval_steps=0)


def test_two_processes_reduce_counts_and_write_once(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(HERE / "trainer_run.py"), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = read_records(tmp_path / "gatepro_metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 3, 4]  # one writer: each step once
    assert [line["gatepro_active"] for line in lines] == [False, False, True, True]
    for line in lines:
        assert line["tokens"] == 2 * line["step"] * TOKENS_PER_STEP
        assert all(layer["routed_tokens"] == 2 * TOKENS_PER_STEP for layer in line["layers"])  # both ranks' tokens
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0] == ranks[1] and len(ranks[0]) == 4  # every rank logs the same reduced metrics
    assert [entry["gatepro/layer_00/load_imbalance"] for entry in ranks[0]] == [
        line["layers"][0]["load_imbalance"] for line in lines]
