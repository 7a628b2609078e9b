"""The continued-training recipe end to end on a tiny stand-in checkpoint: continue both arms,
evaluate, compare, inspect (the README's "Continued training" commands)."""

import json

import pytest

from olmoe_gatepro.cli import main
from olmoe_gatepro.jsonl import read_records
from olmoe_gatepro.pipelines.presets import TinyRunConfig
from olmoe_gatepro.pipelines.tiny_run import build_tiny_olmoe, save_checkpoint
from test_bad_inputs import _refused, _snapshot

ARMS = {"baseline": ["--baseline"], "gatepro": ["--gatepro-penalty", "0.05"]}
TRAIN = ["--train-tokens", "256", "--sequence-length", "32", "--batch-size", "2", "--learning-rate", "1e-3",
         "--metrics-interval", "1"]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """A tiny 'existing checkpoint' (byte tokenizer) and token files made by prepare-data."""
    folder = tmp_path_factory.mktemp("stand-in")
    save_checkpoint(build_tiny_olmoe(TinyRunConfig(num_layers=2, num_experts=8, top_k=2, hidden_size=32, num_heads=2,
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
    _refused(["continue", base, "--data", text, "--baseline", "--train-tokens", "2.5", "--out", "x"], capsys,
             "--train-tokens: expected a whole number, got '2.5'")
    _refused(["continue", base, "--data", text, "--baseline", "--train-tokens", "8", "--out", "x"], capsys,
             "--train-tokens: train_tokens 8 is less than one optimizer step")
    _refused(["continue", base, "--data", text, "--baseline", "--train-tokens", "1e6", "--sequence-length", "32",
              "--out", "x"], capsys, "fewer than the 999936 to train on")
    _refused(["continue", base, "--data", text, "--gatepro-penalty", "-1", *TRAIN[:2], "--out", "x"], capsys,
             "--gatepro-penalty: penalty must be finite and >= 0")
    _refused(["continue", base, "--data", text, *TRAIN, "--out", "x"], capsys,
             "one of the arguments --gatepro-penalty --baseline is required")
    _refused(["continue", "nowhere", "--data", text, "--baseline", *TRAIN, "--out", "x"], capsys,
             "model nowhere: no such folder")
    assert _snapshot(tmp_path) == before
