"""OLMo-core OLMoE checkpoint -> Hugging Face OlmoeForCausalLM, checked against OLMo-core's forward.

OLMo-core's MoE runs on the CPU here (``olmoe_gatepro.olmo_core.cpu``).
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


def _random_weights(model):
    """``model`` (OLMo-core) with seeded random weights: norm gains near 1, everything else 0.1-scale noise."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.1 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(run config, OLMo-core model, step folder) of a random tiny OLMoE saved as OLMo-core saves it."""
    from olmoe_gatepro.olmo_core.cpu import enable_cpu_moe

    enable_cpu_moe()
    from olmo_core.distributed.checkpoint import save_model_and_optim_state

    from olmoe_gatepro.olmo_core.train import build_transformer_config

    folder = tmp_path_factory.mktemp("olmo-core")
    run = load_run_config(str(ROOT / "configs/tiny.yaml"), [*SHAPE, f"--train.save_folder={folder}"])
    model = _random_weights(build_transformer_config(run.model).build(init_device="cpu"))
    step_dir = folder / "step3"
    save_model_and_optim_state(str(step_dir / "model_and_optim"), model)
    return run, model, step_dir


def _olmo_core_saved_config(model_config, tokenizer_file: str) -> dict:
    """What OLMo-core's ConfigSaverCallback writes into a step folder (``ExperimentConfig.as_config_dict()``),
    for the sections convert reads: the model, and the dataset with its tokenizer."""
    from olmo_core.data import NumpyFSLDatasetConfig, TokenizerConfig

    tokenizer = TokenizerConfig(vocab_size=256, eos_token_id=0, pad_token_id=1, identifier=tokenizer_file)
    dataset = NumpyFSLDatasetConfig(paths=["/data/part-0.npy"], sequence_length=64, tokenizer=tokenizer)
    return {"run_name": "tiny-reordered", "model": model_config.as_config_dict(), "dataset": dataset.as_config_dict()}


@pytest.fixture(scope="module")
def saved_reordered(tmp_path_factory):
    """(OLMo-core model, step folder) of a random tiny ``moe_reordered_norm`` OLMoE (OLMo-core's default block),
    the step folder holding OLMo-core's saved config.json, and no run_config.json beside it."""
    from olmoe_gatepro.olmo_core.cpu import enable_cpu_moe

    enable_cpu_moe()
    from olmo_core.distributed.checkpoint import save_model_and_optim_state

    from olmoe_gatepro.data import byte_tokenizer
    from olmoe_gatepro.olmo_core.train import build_transformer_config

    folder = tmp_path_factory.mktemp("olmo-core-reordered")
    run = load_run_config(str(ROOT / "configs/tiny.yaml"), [*SHAPE, "--model.block=moe_reordered_norm"])
    model_config = build_transformer_config(run.model)
    model = _random_weights(model_config.build(init_device="cpu"))
    tokenizer_file = folder / "tokenizer.json"
    byte_tokenizer().backend_tokenizer.save(str(tokenizer_file))
    step_dir = folder / "run/step5"
    save_model_and_optim_state(str(step_dir / "model_and_optim"), model)
    (step_dir / "config.json").write_text(json.dumps(_olmo_core_saved_config(model_config, str(tokenizer_file))))
    return model, step_dir


def _hf_model(folder, architecture="OlmoeForCausalLM"):
    """The converted model, loaded as transformers loads it; no key may be missing, unexpected or resized."""
    import transformers

    model, loading = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                       output_loading_info=True)
    assert type(model) is getattr(transformers, architecture)
    assert not any(loading[kind] for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")), loading
    return model.eval()


def _same_logits_with_and_without_gatepro(model, hf_model):
    """The converted model scores like OLMo-core's, stock and with both GatePro plugins at the same lambda."""
    from olmoe_gatepro import gatepro_settings, patch_olmo_core, patch_transformers, unpatch

    tokens = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, model(tokens), rtol=1e-5, atol=1e-5)
        try:
            patch_olmo_core(penalty=0.05, model=model)
            patch_transformers(penalty=0.05, model=hf_model)
            gatepro = model(tokens)
            torch.testing.assert_close(hf_model(tokens).logits, gatepro, rtol=1e-5, atol=1e-5)
            with gatepro_settings(model, enabled=False):
                assert (model(tokens) - gatepro).abs().max() > 1e-4  # lambda 0.05 changed routing
        finally:
            unpatch()


def test_converted_model_scores_like_olmo_core_with_and_without_gatepro(saved, tmp_path):
    run, model, step_dir = saved
    record = convert_checkpoint(str(step_dir), str(tmp_path / "hf"), run=run)
    assert record["step"] == 3 and record["validation"]["max_abs_logit_difference"] <= 1e-4
    assert record["architecture"] == "OlmoeForCausalLM" and record["config"] is None
    assert not os.path.exists(tmp_path / "hf.partial")
    _same_logits_with_and_without_gatepro(model, _hf_model(tmp_path / "hf"))


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


def test_reordered_norm_checkpoint_becomes_flex_olmo_from_olmo_cores_saved_config(saved_reordered, tmp_path):
    from olmoe_gatepro.checkpoints import model_kind

    model, step_dir = saved_reordered
    assert model_kind(str(step_dir)) == "olmo-core"  # its config.json is OLMo-core's, not a Hugging Face model's
    record = convert_checkpoint(str(step_dir), str(tmp_path / "hf"))  # no run config: OLMo-core's config.json
    assert record["architecture"] == "FlexOlmoForCausalLM" and record["config"] == str(step_dir / "config.json")
    assert (record["step"], record["run"], record["gatepro_in_training"]) == (5, "tiny-reordered", None)
    assert record["validation"]["max_abs_logit_difference"] <= 1e-4
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["model_type"] == "flex_olmo" and config["norm_topk_prob"] is False
    assert (config["num_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == (8, 2, 48)
    assert (config["eos_token_id"], config["pad_token_id"], config["rms_norm_eps"]) == (0, 1, 1e-6)
    with safe_open(tmp_path / "hf/model.safetensors", "pt") as file:
        keys = set(file.keys())
        assert file.get_tensor("model.layers.1.mlp.experts.7.up_proj.weight").shape == (48, 32)
    assert {"model.layers.0.post_attention_layernorm.weight", "model.layers.0.post_feedforward_layernorm.weight"} <= keys
    assert not any("input_layernorm" in key for key in keys) and len(keys) == 3 + 2 * (4 + 2 + 2 + 1 + 3 * 8)
    _same_logits_with_and_without_gatepro(model, _hf_model(tmp_path / "hf", "FlexOlmoForCausalLM"))


def _edited_copy(step_dir, folder, edit):
    """A copy of ``step_dir`` whose OLMo-core config.json ``edit`` (a function of the dict) has changed."""
    import shutil

    shutil.copytree(step_dir, folder)
    saved = json.loads((folder / "config.json").read_text())
    edit(saved)
    (folder / "config.json").write_text(json.dumps(saved))
    return folder


def test_top_k_weights_renormalised_to_sum_1_become_norm_topk_prob(saved_reordered, tmp_path, capsys):
    from olmoe_gatepro import cli

    model, step_dir = saved_reordered
    tokenizer = json.loads((step_dir / "config.json").read_text())["dataset"]["tokenizer"]["identifier"]

    def renormalise(saved):
        saved["model"]["block"]["feed_forward_moe"]["router"]["normalize_expert_weights"] = 1.0
        saved["dataset"]["tokenizer"]["identifier"] = str(tmp_path / "gone/tokenizer.json")

    edited = _edited_copy(step_dir, tmp_path / "step5", renormalise)
    with pytest.raises(ValueError, match="gone/tokenizer.json.*cannot be loaded.*pass --tokenizer"):
        convert_checkpoint(str(edited), str(tmp_path / "hf"))
    assert cli.main(["convert", str(edited), "--out", str(tmp_path / "hf"), "--tokenizer", tokenizer]) == 0
    assert f"wrote {tmp_path / 'hf'}: FlexOlmoForCausalLM (step 5 of" in capsys.readouterr().out
    record = json.loads((tmp_path / f"hf/{PROVENANCE_FILE}").read_text())
    assert record["validation"]["max_abs_logit_difference"] <= 1e-4  # against OLMo-core with p=1 renormalisation
    assert json.loads((tmp_path / "hf/config.json").read_text())["norm_topk_prob"] is True
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the setting matters: unnormalised weights score differently
        assert (_hf_model(tmp_path / "hf", "FlexOlmoForCausalLM")(tokens).logits - model(tokens)).abs().max() > 1e-3


def _shared_expert():
    from olmo_core.nn.feed_forward import FeedForwardConfig

    return FeedForwardConfig(hidden_size=32, bias=False)


REFUSED = {
    "sigmoid router": (lambda moe, attention: setattr(moe.router, "gating_function", "sigmoid"),
                       "router.gating_function 'sigmoid'"),
    "score bias": (lambda moe, attention: setattr(moe.router, "bias_gamma", 1e-4), "router.bias_gamma 0.0001"),
    "L2-normalised weights": (lambda moe, attention: setattr(moe.router, "normalize_expert_weights", 2.0),
                              "normalize_expert_weights 2.0"),
    "head-wise QK-norm": (lambda moe, attention: setattr(attention, "use_head_qk_norm", True), "use_head_qk_norm True"),
    "clipped QKV": (lambda moe, attention: setattr(attention, "clip_qkv", 8.0), "clip_qkv 8.0: OLMo-core clips before"),
    "shared expert": (lambda moe, attention: setattr(moe, "shared_mlp", _shared_expert()), "shared_mlp 'set'"),
    "token dropping": (lambda moe, attention: setattr(moe, "name", "default"), "feed_forward_moe.name 'default'"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_no_hugging_face_class_computes_is_refused_by_its_key(case):
    import copy

    from olmoe_gatepro.olmo_core.convert import hf_architecture
    from olmoe_gatepro.olmo_core.train import build_transformer_config

    base = build_transformer_config(load_run_config(str(ROOT / "configs/tiny.yaml"), SHAPE).model)
    assert hf_architecture(base) == "OlmoeForCausalLM"
    config = copy.deepcopy(base)
    edit, message = REFUSED[case]
    edit(config.block.feed_forward_moe, config.block.sequence_mixer)
    with pytest.raises(ValueError, match=f"no Hugging Face class computes this OLMo-core model: .*{message}"):
        hf_architecture(config)


def test_every_reason_is_named_and_nothing_is_read_or_written(saved_reordered, tmp_path):
    _, step_dir = saved_reordered

    def hybrid_with_score_bias(saved):
        saved["model"]["block"]["name"] = "moe_hybrid"
        saved["model"]["block"]["feed_forward_moe"]["router"]["bias_gamma"] = 1e-3

    edited = _edited_copy(step_dir, tmp_path / "step5", hybrid_with_score_bias)
    with pytest.raises(ValueError, match="block.name 'moe_hybrid': no Hugging Face MoE class has this block.*bias_gamma"):
        convert_checkpoint(str(edited), str(tmp_path / "hf"))
    assert sorted(os.listdir(tmp_path)) == ["step5"]


@pytest.mark.parametrize("block", ["moe", "moe_reordered_norm"])
def test_a_wrong_mapping_fails_validation_and_writes_nothing(block, saved, saved_reordered, tmp_path, monkeypatch):
    import olmoe_gatepro.olmo_core.convert as convert

    run, _, step_dir = saved
    if block == "moe_reordered_norm":
        run, step_dir = None, saved_reordered[1]
    correct = convert.olmo_core_state_to_hf
    norms = {"moe": ("input_layernorm", "post_attention_layernorm"),
             "moe_reordered_norm": ("post_attention_layernorm", "post_feedforward_layernorm")}[block]

    def swapped_norms(state, hf_config):
        hf_state = correct(state, hf_config)
        for layer in range(hf_config.num_hidden_layers):
            first, second = (f"model.layers.{layer}.{name}.weight" for name in norms)
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
    with pytest.raises(FileNotFoundError, match="holds no OLMo-core checkpoint"):
        convert_checkpoint(str(tmp_path), str(tmp_path / "c"), run=run)
    with pytest.raises(FileNotFoundError, match="run_config.json not found, nor OLMo-core's .*step3/config.json"):
        convert_checkpoint(str(step_dir), str(tmp_path / "d"))
    assert sorted(os.listdir(tmp_path)) == ["taken"]


def test_convert_command_names_a_missing_checkpoint(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "olmoe_gatepro.cli", "convert", str(tmp_path / "nope"), "--out", str(tmp_path / "hf")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and "nope: no such folder" in result.stderr


@pytest.mark.parametrize("block", ["moe", "moe_reordered_norm"])
def test_inspect_reads_an_olmo_core_checkpoint_through_the_converter(block, saved, saved_reordered, tmp_path):
    import dataclasses
    import shutil

    from olmoe_gatepro.evaluation.inspect_routing import ModelToInspect, TextSource, inspect_models

    if block == "moe":
        run, _, step_dir = saved
        save_folder = tmp_path / "run"
        shutil.copytree(step_dir, save_folder / "step3")
        (save_folder / "run_config.json").write_text(json.dumps(dataclasses.asdict(run)))
        step_dir = save_folder / "step3"
    else:  # a step folder with OLMo-core's config.json in it
        step_dir = tmp_path / "step5"
        shutil.copytree(saved_reordered[1], step_dir)
    convert_checkpoint(str(step_dir), str(tmp_path / "hf"))
    before = sorted(os.listdir(step_dir.parent))
    source = TextSource(tokens=None, texts=(str(ROOT / "README.md"),), max_tokens=200, sequence_length=50)
    routing = inspect_models([ModelToInspect(str(step_dir), "olmo-core"), ModelToInspect(str(tmp_path / "hf"), "hf")],
                             source)
    from_checkpoint, from_folder = routing["models"]
    assert from_checkpoint["tokens"] == 200 and len(from_checkpoint["layers"]) == 2
    for a, b in zip(from_checkpoint["layers"], from_folder["layers"]):
        assert a["coactivation_matrix"] == b["coactivation_matrix"] and a["flip_rate"] == b["flip_rate"]
    assert sorted(os.listdir(step_dir.parent)) == before  # no folder written beside the checkpoint
