"""OLMo-core OLMoE checkpoint -> Hugging Face OlmoeForCausalLM, checked against OLMo-core's forward.

OLMo-core's MoE runs on the CPU here through Triton's interpreter (see conftest.py).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from olmoe_gatepro.olmo_core.run_config import load_run_config
from olmoe_gatepro.olmo_core.convert import PROVENANCE_FILE, convert_checkpoint

ROOT = Path(__file__).resolve().parents[2]
# expert_hidden_size != d_model, so that a transposed expert matrix cannot pass unnoticed.
SHAPE = ["--model.d_model=32", "--model.expert_hidden_size=48", "--model.n_heads=4", "--model.n_layers=2",
         "--model.num_experts=8", "--model.top_k=2"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(run config, OLMo-core model, step folder) of a random tiny OLMoE saved as OLMo-core saves it."""
    from olmoe_gatepro.olmo_core.cpu import enable_cpu_moe

    enable_cpu_moe()
    from olmo_core.distributed.checkpoint import save_model_and_optim_state

    from olmoe_gatepro.olmo_core.train import build_transformer_config

    folder = tmp_path_factory.mktemp("olmo-core")
    run = load_run_config(str(ROOT / "configs/tiny-test.yaml"), [*SHAPE, f"--train.save_folder={folder}"])
    model = build_transformer_config(run.model).build(init_device="cpu").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.1 * noise)
    step_dir = folder / "step3"
    save_model_and_optim_state(str(step_dir / "model_and_optim"), model)
    return run, model, step_dir


def _hf_model(folder):
    from transformers import OlmoeForCausalLM

    return OlmoeForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_converted_model_scores_like_olmo_core_with_and_without_gatepro(saved, tmp_path):
    from olmoe_gatepro import gatepro_settings, patch_olmo_core, patch_transformers, unpatch

    run, model, step_dir = saved
    record = convert_checkpoint(str(step_dir), str(tmp_path / "hf"), run=run)
    assert record["step"] == 3 and record["validation"]["max_abs_logit_difference"] <= 1e-4
    assert not os.path.exists(tmp_path / "hf.partial")
    hf_model = _hf_model(tmp_path / "hf")
    tokens = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, model(tokens), rtol=1e-5, atol=1e-5)
        try:  # both plugins, same lambda: the converted model must still route as OLMo-core does
            patch_olmo_core(penalty=0.05, model=model)
            patch_transformers(penalty=0.05, model=hf_model)
            gatepro = model(tokens)
            torch.testing.assert_close(hf_model(tokens).logits, gatepro, rtol=1e-5, atol=1e-5)
            with gatepro_settings(model, enabled=False):
                assert (model(tokens) - gatepro).abs().max() > 1e-4  # lambda 0.05 changed routing
        finally:
            unpatch()


def test_hf_folder_has_the_published_olmoe_layout(saved, tmp_path):
    run, _, step_dir = saved
    convert_checkpoint(str(step_dir), str(tmp_path / "hf"), run=run, dtype="bfloat16")
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["model_type"] == "olmoe" and config["architectures"] == ["OlmoeForCausalLM"]
    assert (config["num_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == (8, 2, 48)
    assert config["rms_norm_eps"] == 1e-6 and config["norm_topk_prob"] is False
    with safe_open(tmp_path / "hf/model.safetensors", "pt") as file:
        keys = set(file.keys())
        assert file.get_tensor("model.layers.1.mlp.experts.7.gate_proj.weight").shape == (48, 32)
        assert file.get_tensor("model.layers.1.mlp.experts.7.down_proj.weight").shape == (32, 48)
        assert file.get_tensor("model.layers.0.mlp.gate.weight").dtype == torch.bfloat16
    assert {"model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
            "model.layers.0.self_attn.q_norm.weight", "lm_head.weight"} <= keys
    assert len(keys) == 3 + 2 * (4 + 2 + 2 + 1 + 3 * 8)
    provenance = json.loads((tmp_path / f"hf/{PROVENANCE_FILE}").read_text())
    assert provenance["gatepro_in_training"]["penalty"] == run.gatepro.penalty and provenance["dtype"] == "bfloat16"
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("ab")["input_ids"] == [97, 98]


def test_a_wrong_mapping_fails_validation_and_writes_nothing(saved, tmp_path, monkeypatch):
    import olmoe_gatepro.olmo_core.convert as convert

    run, _, step_dir = saved
    correct = convert.olmo_core_state_to_hf

    def swapped_norms(state, run):
        hf_state = correct(state, run)
        for layer in range(run.model.n_layers):
            first, second = (f"model.layers.{layer}.{name}.weight" for name in ("input_layernorm", "post_attention_layernorm"))
            hf_state[first], hf_state[second] = hf_state[second], hf_state[first]
        return hf_state

    monkeypatch.setattr(convert, "olmo_core_state_to_hf", swapped_norms)
    with pytest.raises(RuntimeError, match="does not match OLMo-core"):
        convert_checkpoint(str(step_dir), str(tmp_path / "hf"), run=run)
    assert os.listdir(tmp_path) == []


def test_conversion_refusals(saved, tmp_path):
    run, _, step_dir = saved
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken/keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="taken already exists"):
        convert_checkpoint(str(step_dir), str(tmp_path / "taken"), run=run)
    assert (tmp_path / "taken/keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        convert_checkpoint(str(step_dir), str(tmp_path / "a"), run=run, dtype="fp8")
    reordered = load_run_config(str(ROOT / "configs/tiny-test.yaml"), [*SHAPE, "--model.block=moe_reordered_norm"])
    with pytest.raises(ValueError, match="model.block 'moe_reordered_norm'"):
        convert_checkpoint(str(step_dir), str(tmp_path / "b"), run=reordered)
    with pytest.raises(FileNotFoundError, match="holds no OLMo-core checkpoint"):
        convert_checkpoint(str(tmp_path), str(tmp_path / "c"), run=run)
    with pytest.raises(FileNotFoundError, match="run_config.json not found"):
        convert_checkpoint(str(step_dir), str(tmp_path / "d"))
    assert sorted(os.listdir(tmp_path)) == ["taken"]


def test_convert_command_names_a_missing_checkpoint(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "olmoe_gatepro.cli", "convert", str(tmp_path / "nope"), "--out", str(tmp_path / "hf")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and "nope: no such folder" in result.stderr


def test_inspect_reads_an_olmo_core_checkpoint_through_the_converter(saved, tmp_path):
    import dataclasses
    import shutil

    from olmoe_gatepro.evaluation.inspect_routing import ModelToInspect, TextSource, inspect_models

    run, _, step_dir = saved
    save_folder = tmp_path / "run"
    shutil.copytree(step_dir, save_folder / "step3")
    (save_folder / "run_config.json").write_text(json.dumps(dataclasses.asdict(run)))
    convert_checkpoint(str(save_folder / "step3"), str(tmp_path / "hf"))
    before = sorted(os.listdir(save_folder))
    source = TextSource(tokens=None, texts=(str(ROOT / "README.md"),), max_tokens=200, sequence_length=50)
    routing = inspect_models([ModelToInspect(str(save_folder / "step3"), "olmo-core"), ModelToInspect(str(tmp_path / "hf"), "hf")],
                             source)
    from_checkpoint, from_folder = routing["models"]
    assert from_checkpoint["tokens"] == 200 and len(from_checkpoint["layers"]) == 2
    for a, b in zip(from_checkpoint["layers"], from_folder["layers"]):
        assert a["coactivation_matrix"] == b["coactivation_matrix"] and a["flip_rate"] == b["flip_rate"]
    assert sorted(os.listdir(save_folder)) == before  # no folder written beside the checkpoint
