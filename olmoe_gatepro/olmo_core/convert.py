"""Convert an OLMo-core OLMoE checkpoint into a Hugging Face ``OlmoeForCausalLM`` folder.

OLMo-core 3.0 converts dense OLMo models and writes MoE models as FlexOlmo; it has no mapping
for OLMoE, whose blocks are pre-norm. This converter uses OLMo-core's own pieces (its key
tables and ``StateConverter``, after the same dropless-expert reshape as its own converter) and
changes only where the two block norms go: ``attention_norm`` -> ``input_layernorm`` and ``feed_forward_norm`` ->
``post_attention_layernorm``, as in transformers' ``OlmoeDecoderLayer``. Experts are written one
tensor per expert, the layout of the published ``allenai/OLMoE-1B-7B-0924`` files (transformers
5 fuses the experts while loading them).

Validation (on by default): the OLMo-core model and the converted HF model score the same
random tokens with stock routing, in float32, and the largest logit difference must stay under
``tolerance`` times the largest logit (at least 1). The folder is written as ``<out>.partial``
and renamed only when complete and validated, so ``<out>`` is never half-written; a
``<out>.partial`` that this converter did not create is never touched.
"""

import dataclasses
import json
import os
import shutil
import tempfile

import torch

from olmoe_gatepro.checkpoints import find_checkpoint
from olmoe_gatepro.jsonl import os_error_of, write_error, write_text_atomically
from olmoe_gatepro.olmo_core.cpu import enable_cpu_moe
from olmoe_gatepro.olmo_core.run_config import RUN_CONFIG_FILE, RunConfig, load_run_config
from olmoe_gatepro.olmo_core.train import build_transformer_config
from olmoe_gatepro.provenance import git_revision, package_versions

__all__ = ["PROVENANCE_FILE", "olmoe_hf_config", "convert_checkpoint", "checkpoint_index"]

PROVENANCE_FILE = "olmoe_gatepro.json"
PARTIAL_MARKER = ".olmoe-gatepro-convert"  # marks <out>.partial as ours: safe to replace after an interruption
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def olmoe_hf_config(run: RunConfig, olmo_core_config, eos_token_id: int, pad_token_id: int):
    """The ``OlmoeConfig`` of ``run``'s model; refuses what ``OlmoeForCausalLM`` cannot express."""
    from transformers import OlmoeConfig

    model = run.model
    if model.block != "moe":
        raise ValueError(
            f"model.block {model.block!r}: OlmoeForCausalLM is pre-norm ('moe'); a checkpoint with "
            "norms after attention and MoE has no stock Hugging Face class"
        )
    if not model.qk_norm:
        raise ValueError("model.qk_norm false: OlmoeForCausalLM always applies QK-norm")
    return OlmoeConfig(
        architectures=["OlmoeForCausalLM"],
        vocab_size=model.embedding_size,
        hidden_size=model.d_model,
        intermediate_size=model.expert_hidden_size,
        num_hidden_layers=model.n_layers,
        num_attention_heads=model.n_heads,
        num_key_value_heads=model.n_heads,
        num_experts=model.num_experts,
        num_experts_per_tok=model.top_k,
        norm_topk_prob=False,
        rms_norm_eps=olmo_core_config.block.layer_norm.eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(model.rope_theta)},
        # RoPE has no learned positions; OLMoE's own config says 4096. A shorter training length
        # here would make lm-eval cut prompts down to it.
        max_position_embeddings=max(run.train.sequence_length, 4096),
        router_aux_loss_coef=model.lb_loss_weight,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def _olmoe_state_converter():
    """OLMo-core's OLMo-core-to-HF key templates, with OLMoE's pre-norm block norms."""
    from olmo_core.nn.conversion.state_converter import StateConverter
    from olmo_core.nn.conversion.state_mapping import StateMappingTemplate, StateType
    from olmo_core.nn.hf import convert

    templates = {
        source: StateMappingTemplate(source, target, state_type=StateType.weight)
        for source, target in convert.OLMO_CORE_TO_HF_WEIGHT_MAPPINGS.items()
    }
    templates.update(convert.OLMO_CORE_TO_HF_TEMPLATE_MAPPINGS)
    layer = convert.LAYER
    for source, target in (("attention_norm", "input_layernorm"), ("feed_forward_norm", "post_attention_layernorm")):
        key = f"blocks.{layer}.{source}.weight"
        templates[key] = StateMappingTemplate(key, f"model.layers.{layer}.{target}.weight", state_type=StateType.weight)
    return StateConverter(list(templates.values()))


def olmo_core_state_to_hf(state: dict[str, torch.Tensor], run: RunConfig) -> dict[str, torch.Tensor]:
    """An unsharded OLMo-core OLMoE state dict (dropless experts) in ``OlmoeForCausalLM``'s keys."""
    from olmo_core.nn.conversion.state_mapping import TemplatePlaceholder

    experts, hidden = run.model.num_experts, run.model.expert_hidden_size
    state = dict(state)
    for key, value in state.items():
        # Dropless experts keep w1 and w3 as (d_model, N * hidden) blocks; OLMo-core's own
        # converter reshapes them the same way before applying its templates.
        if key.endswith((".feed_forward_moe.experts.mlp.w1", ".feed_forward_moe.experts.mlp.w3")):
            state[key] = value.reshape(experts, hidden, -1).permute(0, 2, 1).reshape(-1, hidden)
    bounds = {TemplatePlaceholder.LAYER: run.model.n_layers, TemplatePlaceholder.EXPERT: experts}
    hf_state = _olmoe_state_converter().convert(state, bounds)
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


def _load_olmo_core_model(run: RunConfig, step_dir: str):
    from olmo_core.distributed.checkpoint import load_model_and_optim_state
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    folder = os.path.join(step_dir, "model_and_optim")
    metadata = checkpoint_index(folder)
    config = build_transformer_config(run.model)
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
    return config, model.eval()


def _stock_routing(model):
    """GatePro off inside the block when ``model`` has GatePro-routed routers (else a no-op)."""
    import contextlib

    from olmoe_gatepro.core.router_state import SETTINGS_ATTR, gatepro_settings

    if any(hasattr(module, SETTINGS_ATTR) for module in model.modules()):
        return gatepro_settings(model, enabled=False)
    return contextlib.nullcontext()


@torch.no_grad()
def _max_logit_difference(olmo_core_model, folder: str, vocab_size: int, length: int) -> tuple[float, float]:
    """(largest |logit difference|, largest |logit|) of the two models on 2 x ``length`` random tokens."""
    from transformers import OlmoeForCausalLM

    hf_model = OlmoeForCausalLM.from_pretrained(folder, dtype=torch.float32).to(_device()).eval()
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
    dtype: str = "float32",
    validate: bool = True,
    tolerance: float = 1e-4,
) -> dict:
    """Write ``checkpoint`` (a save folder's latest step, or a ``stepN`` folder) to ``out_dir``.

    ``run`` defaults to the ``run_config.json`` that training left in the save folder. Returns
    the provenance record written beside the model (source, step, GatePro settings, validation).
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
    if not torch.cuda.is_available():  # before OLMo-core's MoE code is imported
        enable_cpu_moe()
    step_dir, step = find_checkpoint(checkpoint)
    if run is None:
        config_path = os.path.join(os.path.dirname(os.path.normpath(step_dir)), RUN_CONFIG_FILE)
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"{config_path} not found: pass the run's YAML config (--config)")
        run = load_run_config(config_path)
    tokenizer = hf_tokenizer(run.data.tokenizer, run.data.eos_token_id, run.data.pad_token_id)
    olmo_core_config, model = _load_olmo_core_model(run, step_dir)
    hf_config = olmoe_hf_config(run, olmo_core_config, tokenizer.eos_token_id, tokenizer.pad_token_id)
    hf_config.dtype = dtype
    if dtype != "float32":  # validate the weights as written
        for parameter in model.parameters():
            parameter.data = parameter.data.to(DTYPES[dtype]).float()
    state = {key: value.to("cpu", DTYPES[dtype]) for key, value in model.state_dict().items()}

    shutil.rmtree(partial, ignore_errors=True)  # only ever an interrupted conversion's own leftovers (checked above)
    try:
        os.makedirs(partial)
        write_text_atomically(os.path.join(partial, PARTIAL_MARKER), "")
        save_torch_state_dict(olmo_core_state_to_hf(state, run), partial, max_shard_size="5GB")
        hf_config.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        record = {
            "source": os.path.abspath(step_dir),
            "step": step,
            "run": run.name,
            "gatepro_in_training": dataclasses.asdict(run.gatepro),
            "dtype": dtype,
            "versions": package_versions(),
            "git_revision": git_revision(),
            "validation": None,
        }
        if validate:
            length = min(64, run.train.sequence_length)
            difference, scale = _max_logit_difference(model, partial, run.model.embedding_size, length)
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
