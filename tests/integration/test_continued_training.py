"""The continued-training recipe end to end on a tiny stand-in checkpoint: continue both arms,
evaluate, compare, inspect (the README's "Continued training" commands)."""

import json

import pytest
import torch

from olmoe_gatepro.cli import main
from olmoe_gatepro.jsonl import read_records
from olmoe_gatepro.pipelines.presets import TinyRunConfig
from olmoe_gatepro.pipelines.tiny_run import build_tiny_olmoe, save_checkpoint
from test_bad_inputs import _refused, _snapshot

ARMS = {"baseline": ["--baseline"], "gatepro": ["--gatepro-penalty", "0.05"]}
TRAIN = ["--max-tokens", "256", "--sequence-length", "32", "--micro-batch-sequences", "2", "--lr", "1e-3",
         "--metrics-interval-steps", "1"]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """A tiny 'existing checkpoint' (byte tokenizer) and token files made by prepare-data."""
    folder = tmp_path_factory.mktemp("stand-in")
    save_checkpoint(build_tiny_olmoe(TinyRunConfig(n_layers=2, num_experts=8, top_k=2, d_model=32, n_heads=2,
                                                   expert_hidden_size=16)), str(folder / "base"))
    (folder / "corpus.txt").write_text("Experts that look alike should not be chosen together. " * 40)
    assert main(["prepare-data", str(folder / "corpus.txt"), "--out", str(folder / "tokens")]) == 0
    return folder


def test_recipe_continue_both_arms_then_evaluate_and_compare(stand_in, tmp_path):
    for arm, flags in ARMS.items():
        assert main(["continue", str(stand_in / "base"), "--data", str(stand_in / "tokens/part-00000.npy"), *flags,
                     *TRAIN, "--out", str(tmp_path / arm)]) == 0
        record = json.loads((tmp_path / arm / "hf" / "continued_training.json").read_text())
        assert record["steps"] == 4 and record["tokens"] == 256
        lines = read_records(tmp_path / arm / "gatepro_metrics.jsonl")
        assert [line["gatepro_active"] for line in lines] == [arm == "gatepro"] * 4
        evaluation = ["eval", str(tmp_path / arm / "hf"), "--label", arm, "--tasks", "copa", "--limit", "4",
                      "--out", str(tmp_path / arm)]
        assert main(evaluation + (["--gatepro-penalty", "0.05"] if arm == "gatepro" else [])) == 0
    assert main(["compare", str(tmp_path / "baseline"), str(tmp_path / "gatepro"), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert "**gatepro** vs baseline:" in table and "| gatepro | on, lambda 0.05 |" in table
    assert main(["inspect", str(tmp_path / "baseline" / "hf"), str(tmp_path / "gatepro" / "hf"), "--label", "baseline",
                 "gatepro", "--max-tokens", "256", "--out", str(tmp_path / "routing")]) == 0
    # The two continuations differ in GatePro alone, and GatePro at 0.05 changed their weights.
    from safetensors.torch import load_file

    weights = [load_file(tmp_path / arm / "hf" / "model.safetensors") for arm in ARMS]
    assert any(not (weights[0][key] == weights[1][key]).all() for key in weights[0])


def test_text_data_and_bad_input(stand_in, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = str(stand_in / "base")
    text = str(stand_in / "corpus.txt")
    assert main(["continue", base, "--data", text, "--baseline", *TRAIN, "--out", "text"]) == 0
    assert (tmp_path / "text" / "hf" / "config.json").exists()
    before = _snapshot(tmp_path)
    _refused(["continue", base, "--data", text, "--baseline", *TRAIN, "--out", "text"], capsys,
             "text/hf already exists: this arm is done")
    _refused(["continue", base, "--data", "missing.npy", "--baseline", *TRAIN, "--out", "x"], capsys,
             "--data: no such file missing.npy")
    _refused(["continue", base, "--data", text, "--baseline", "--max-tokens", "2.5", "--out", "x"], capsys,
             "--max-tokens: expected a whole number, got '2.5'")
    _refused(["continue", base, "--data", text, "--baseline", "--max-tokens", "8", "--out", "x"], capsys,
             "--max-tokens: max_tokens 8 is less than one optimizer step")
    _refused(["continue", base, "--data", text, "--baseline", "--max-tokens", "1e6", "--sequence-length", "32",
              "--out", "x"], capsys, "fewer than the 999936 to train on")
    _refused(["continue", base, "--data", text, "--gatepro-penalty", "-1", *TRAIN[:2], "--out", "x"], capsys,
             "--gatepro-penalty: penalty must be finite and >= 0")
    _refused(["continue", base, "--data", text, *TRAIN, "--out", "x"], capsys,
             "one of the arguments --gatepro-penalty --baseline is required")
    _refused(["continue", "nowhere", "--data", text, "--baseline", *TRAIN, "--out", "x"], capsys,
             "model nowhere: no such folder")
    assert _snapshot(tmp_path) == before


LONGER = ["--max-tokens", "1024", "--sequence-length", "32", "--micro-batch-sequences", "2", "--lr", "1e-3",
          "--metrics-interval-steps", "1"]  # 16 steps, checkpoints every 4


def test_ctrl_c_then_rerun_ends_with_the_weights_of_an_uninterrupted_run(stand_in, tmp_path, capsys):
    """A real SIGINT mid-run: exit 130 with a checkpoint of the step it stopped at; a rerun with other
    settings is refused naming them; the same command then resumes every weight (experts included)."""
    from safetensors.torch import load_file

    from interrupting import CLI, interrupt_once

    from olmoe_gatepro.pipelines.tiny_run import deterministic_cpu

    def command(out, *flags):
        return [*CLI, "continue", str(stand_in / "base"), "--data", str(stand_in / "tokens/part-00000.npy"),
                "--gatepro-penalty", "0.05", *LONGER, *flags, "--out", str(out)]

    with deterministic_cpu():  # one thread, as in the interrupted subprocess
        assert main(command(tmp_path / "whole")[len(CLI):]) == 0
    metrics = tmp_path / "cut" / "gatepro_metrics.jsonl"
    code, output, seconds = interrupt_once(command(tmp_path / "cut"), lambda: metrics.exists(), tmp_path / "cut.log")
    assert code == 130 and "Traceback" not in output, output[-3000:]
    stopped = int(output.split("stopped at step ")[1].split()[0])
    assert 1 <= stopped < 16 and (tmp_path / "cut" / f"checkpoint-{stopped}").is_dir(), output[-3000:]
    assert not (tmp_path / "cut" / "hf").exists()
    before = _snapshot(tmp_path / "cut")
    _refused(command(tmp_path / "cut", "--lr", "2e-3", "--seed", "1")[len(CLI):], capsys,
             "holds a run with other settings", "lr: 0.001 there, 0.002 now", "seed: 0 there, 1 now")
    assert _snapshot(tmp_path / "cut") == before
    with deterministic_cpu():
        assert main(command(tmp_path / "cut")[len(CLI):]) == 0
    expected, got = (load_file(tmp_path / name / "hf" / "model.safetensors") for name in ("whole", "cut"))
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    assert read_records(tmp_path / "cut" / "gatepro_metrics.jsonl") == read_records(tmp_path / "whole" / "gatepro_metrics.jsonl")


def _moved_share(base: dict, trained: dict) -> float:
    """The share of all weight elements that training changed."""
    changed = sum(int((trained[key] != base[key].to(trained[key].dtype)).sum()) for key in base)
    return changed / sum(tensor.numel() for tensor in base.values())


def test_bf16_moves_as_many_weights_as_float32(stand_in, tmp_path):
    """At the default lr 1e-5, bfloat16 autocast over float32 weights moves what float32 moves
    (pure bf16 weights: 5% moved against 95%, the bug this guards against)."""
    from safetensors.torch import load_file

    train = [*TRAIN[:6], "--max-tokens", "512", "--lr", "1e-5"]  # 8 steps
    for name, flags in (("float32", []), ("bf16", ["--bf16"])):
        assert main(["continue", str(stand_in / "base"), "--data", str(stand_in / "tokens/part-00000.npy"),
                     "--gatepro-penalty", "0.05", *train, *flags, "--out", str(tmp_path / name)]) == 0
    base = load_file(stand_in / "base" / "model.safetensors")
    trained = {name: load_file(tmp_path / name / "hf" / "model.safetensors") for name in ("float32", "bf16")}
    assert {tensor.dtype for tensors in trained.values() for tensor in tensors.values()} == {torch.float32}
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(stand_in / "base").state_dict()  # the fused layout, like trained
    trained = {name: AutoModelForCausalLM.from_pretrained(tmp_path / name / "hf").state_dict() for name in trained}
    shares = {name: _moved_share(base, weights) for name, weights in trained.items()}
    assert shares["float32"] > 0.5 and abs(shares["bf16"] - shares["float32"]) < 0.01, shares
    assert any(not torch.equal(trained["bf16"][key], trained["float32"][key]) for key in base)  # autocast is on


def test_penalty_zero_is_penalty_zero_and_trains_like_the_baseline(stand_in, tmp_path):
    """``--gatepro-penalty 0`` is GatePro at lambda 0 (it was 1e-4): the same choice as stock routing,
    so in float32 the same weights as the baseline arm, bit for bit."""
    from safetensors.torch import load_file

    for name, flags in (("zero", ["--gatepro-penalty", "0"]), ("baseline", ["--baseline"])):
        assert main(["continue", str(stand_in / "base"), "--data", str(stand_in / "tokens/part-00000.npy"), *flags,
                     *TRAIN, "--out", str(tmp_path / name)]) == 0
    record = json.loads((tmp_path / "zero" / "hf" / "continued_training.json").read_text())
    assert record["settings"]["gatepro"]["enabled"] is True and record["settings"]["gatepro"]["penalty"] == 0
    assert all(line["gatepro_active"] for line in read_records(tmp_path / "zero" / "gatepro_metrics.jsonl"))
    zero, baseline = (load_file(tmp_path / name / "hf" / "model.safetensors") for name in ("zero", "baseline"))
    assert all(torch.equal(zero[key], baseline[key]) for key in baseline)


def test_report_to_is_the_trainers(stand_in, tmp_path, capsys):
    from transformers.integrations import get_available_reporting_integrations

    base, data = str(stand_in / "base"), str(stand_in / "tokens/part-00000.npy")
    _refused(["continue", base, "--data", data, "--baseline", *TRAIN, "--report-to", "carrier-pigeon", "--out", "x"],
             capsys, "--report-to: unknown integration 'carrier-pigeon'", "wandb")
    _refused(["continue", base, "--data", data, "--baseline", *TRAIN, "--report-to", "none", "wandb", "--out", "x"],
             capsys, "--report-to: 'none' and 'all' stand alone")
    installed = get_available_reporting_integrations()
    missing = next(name for name in ("wandb", "comet_ml", "mlflow", "neptune", "clearml") if name not in installed)
    _refused(["continue", base, "--data", data, "--baseline", *TRAIN, "--report-to", missing, "--out", "x"],
             capsys, f"--report-to: {missing} is not installed here")
    assert not (tmp_path / "x").exists()


def test_tokens_become_optimizer_steps_as_in_olmo_core_run_configs(tmp_path):
    """``--max-tokens`` and ``--warmup-tokens`` count tokens (train.max_tokens, optim.warmup_tokens); the Trainer
    gets whole steps: the run's steps rounded down, the warmup's rounded up (a part step of warmup is a step)."""
    from olmoe_gatepro.core.config import GateProRunConfig
    from olmoe_gatepro.pipelines.continued_training import ContinuedTraining, optimizer_steps

    text = tmp_path / "text.txt"
    text.write_text("x")

    def steps(max_tokens, warmup_tokens, world_size=1):
        spec = ContinuedTraining(model="m", data=(str(text),), max_tokens=max_tokens, gatepro=GateProRunConfig(),
                                 sequence_length=32, micro_batch_sequences=2, warmup_tokens=warmup_tokens)
        return optimizer_steps(spec, world_size)

    assert steps(256, 0) == (64, 4, 0)
    assert steps(300, 64) == (64, 4, 1) and steps(300, 65) == (64, 4, 2)
    assert steps(256, 65, world_size=2) == (128, 2, 1)
    with pytest.raises(ValueError, match="max_tokens 63 is less than one optimizer step \\(64 tokens"):
        steps(63, 0)
