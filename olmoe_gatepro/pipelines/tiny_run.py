"""Train a tiny transformers OLMoE on the CPU with and without GatePro and compare routing.

The corpus is built locally with no network: the UTF-8 bytes of the source of a fixed list of
Python standard-library modules, tokenised byte by byte (vocabulary 256), so a step costs
little. Both runs start from the same initial weights and see the same batches; only the
GatePro setting differs.

Determinism: on the CPU, training runs inside ``deterministic_cpu()``: one intra-op thread and
torch's deterministic algorithms. torch's CPU kernels sum in an order that depends on the
thread count, so two runs with different thread counts (or on machines with other core counts)
drift apart within tens of steps; with one thread, the same seed gives bit-identical weights
in every process on a given machine and software stack, whatever the environment says.
"""

import contextlib
import dataclasses
import inspect
import importlib
import json
import math
import os
import sysconfig
import time
from dataclasses import dataclass

import torch
from torch import nn

from olmoe_gatepro.core import metrics
from olmoe_gatepro.core.config import GateProConfig
from olmoe_gatepro.core.gatepro import competition_partners
from olmoe_gatepro.pipelines.data_prep import byte_tokenizer
from olmoe_gatepro.jsonl import write_text_atomically
from olmoe_gatepro.core.router_state import refresh_partners
from olmoe_gatepro.transformers.patch import olmoe_routers, patch_transformers

__all__ = [
    "TinyRunConfig",
    "deterministic_cpu",
    "corpus_tokens",
    "build_tiny_olmoe",
    "save_checkpoint",
    "train_tiny",
    "compare_tiny",
    "format_comparison",
]

CORPORA = ("small", "stdlib")
HELD_OUT_SEED = 1234  # the held-out batch is the same for every run and seed
CORPUS_MODULES = ("argparse", "collections", "dataclasses", "difflib", "json.decoder", "textwrap")
LAYER_METRICS = (
    "avg_cosine_similarity",
    "avg_angle_deg",
    "spectral_entropy",
    "zero_token_count",
    "load_imbalance",
    "flip_rate",
    "partner_coactivation",
    "partner_coactivation_chance",
    "margin_below_penalty",
)


@dataclass(frozen=True)
class TinyRunConfig:
    """A tiny OLMoE and its CPU training run."""

    seed: int = 0
    steps: int = 40
    batch_size: int = 16
    seq_len: int = 128
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_experts: int = 16
    top_k: int = 4
    expert_hidden_size: int = 64
    learning_rate: float = 3e-3
    router_aux_loss_coef: float = 0.01
    log_every: int = 10
    device: str = "cpu"
    corpus: str = "small"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "hidden_size", "num_layers", "num_heads", "expert_hidden_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2; got {self.seq_len}")
        if self.num_experts < 2:
            raise ValueError(f"num_experts must be >= 2 for GatePro; got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must lie in [1, num_experts = {self.num_experts}]; got {self.top_k}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be finite and > 0; got {self.learning_rate}")
        if not math.isfinite(self.router_aux_loss_coef) or self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef must be finite and >= 0; got {self.router_aux_loss_coef}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0; got {self.seed}")
        if self.corpus not in CORPORA:
            raise ValueError(f"corpus must be one of {', '.join(CORPORA)}; got {self.corpus!r}")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda[:N]; got {self.device!r}")


@contextlib.contextmanager
def deterministic_cpu():
    """Inside the block: one intra-op thread and torch's deterministic algorithms; restored after."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def corpus_tokens(corpus: str = "small") -> torch.Tensor:
    """int64 (T,): UTF-8 bytes of standard-library sources.

    ``small``: the modules in ``CORPUS_MODULES`` (about 0.3M tokens); ``stdlib``: every ``.py``
    file of the standard library but site-packages, in sorted order (tens of millions of tokens).
    """
    if corpus == "small":
        text = "\n".join(inspect.getsource(importlib.import_module(name)) for name in CORPUS_MODULES)
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    if corpus == "stdlib":
        root = sysconfig.get_paths()["stdlib"]
        paths = []
        for folder, subfolders, names in os.walk(root):
            subfolders[:] = sorted(d for d in subfolders if d not in ("site-packages", "__pycache__"))
            paths += [os.path.join(folder, name) for name in sorted(names) if name.endswith(".py")]
        data = bytearray()
        for path in paths:
            with open(path, "rb") as file:
                data += file.read() + b"\n"
        return torch.frombuffer(data, dtype=torch.uint8).long()
    raise ValueError(f"corpus must be 'small' or 'stdlib'; got {corpus!r}")


def build_tiny_olmoe(config: TinyRunConfig) -> nn.Module:
    """A randomly initialised ``OlmoeForCausalLM`` (fp32) seeded with ``config.seed``."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(config.seed)
    model_config = OlmoeConfig(
        vocab_size=256,
        hidden_size=config.hidden_size,
        intermediate_size=config.expert_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        num_experts=config.num_experts,
        num_experts_per_tok=config.top_k,
        max_position_embeddings=max(config.seq_len, 4096),  # RoPE: lets lm-eval score long prompts
        router_aux_loss_coef=config.router_aux_loss_coef,
        output_router_logits=config.router_aux_loss_coef > 0,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    return OlmoeForCausalLM(model_config)


def save_checkpoint(model: nn.Module, folder: str) -> None:
    """Save a tiny model with its byte tokenizer as a Hugging Face folder."""
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)


def _batches(tokens: torch.Tensor, config: TinyRunConfig) -> torch.Tensor:
    """(steps, batch, seq_len + 1) windows of ``tokens`` in a seeded random order."""
    generator = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(
        0, tokens.numel() - config.seq_len - 1, (config.steps, config.batch_size), generator=generator
    )
    return tokens[starts.unsqueeze(-1) + torch.arange(config.seq_len + 1)]


class _RouterRecorder:
    """Keeps each router's last input (N_tokens, d) and chosen experts (N_tokens, k) while on."""

    def __init__(self, routers: list[nn.Module]):
        self.inputs: list[torch.Tensor | None] = [None] * len(routers)
        self.chosen: list[torch.Tensor | None] = [None] * len(routers)
        self.active = False
        for layer, router in enumerate(routers):
            router.register_forward_hook(self._hook(layer))

    def _hook(self, layer: int):
        def record(module, args, output):
            if self.active:
                self.inputs[layer] = args[0].detach().reshape(-1, module.hidden_dim)
                self.chosen[layer] = output[2].detach()

        return record


def _layer_metrics(router: nn.Module, recorded_input, chosen, gatepro: GateProConfig) -> dict[str, float]:
    weight = router.weight.detach()
    raw_logits = torch.nn.functional.linear(recorded_input, weight)
    num_experts, top_k = router.num_experts, router.top_k
    return {
        **metrics.router_weight_metrics(weight),
        "zero_token_count": metrics.zero_token_count(chosen, num_experts),
        "load_imbalance": metrics.load_imbalance(chosen, num_experts),
        "flip_rate": metrics.flip_rate(
            raw_logits,
            weight,
            top_k,
            gatepro.penalty,
            num_competitors=gatepro.num_competitors,
            hard=gatepro.hard,
        ),
        "partner_coactivation": metrics.partner_hits(chosen, competition_partners(weight)).item() / chosen.numel(),
        "partner_coactivation_chance": metrics.partner_coactivation_chance(num_experts, top_k),
        "margin_below_penalty": (metrics.boundary_margins(raw_logits, top_k) < gatepro.penalty).double().mean().item(),
    }


def train_tiny(
    config: TinyRunConfig,
    gatepro: GateProConfig,
    tokens: torch.Tensor,
    progress=None,
    checkpoint_dir: str | None = None,
) -> list[dict]:
    """Train one tiny OLMoE; return a record per logged step with loss and per-layer metrics.

    ``gatepro.enabled = False`` is the baseline; its flip rate tells what GatePro with the
    other settings of ``gatepro`` would change in the baseline's routing. With
    ``checkpoint_dir`` the trained model is saved there (stock keys, byte tokenizer). On the
    CPU it runs inside ``deterministic_cpu()``.
    """
    context = deterministic_cpu() if torch.device(config.device).type == "cpu" else contextlib.nullcontext()
    with context:
        return _train(config, gatepro, tokens, progress, checkpoint_dir)


def _train(config, gatepro, tokens, progress, checkpoint_dir) -> list[dict]:
    device = torch.device(config.device)
    model = build_tiny_olmoe(config).to(device)
    patch_transformers(model=model, config=gatepro)
    routers = olmoe_routers(model)
    recorder = _RouterRecorder(routers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, betas=(0.9, 0.95))
    split = int(tokens.numel() * 0.9)
    train_batches = _batches(tokens[:split], config).to(device)
    held_out = _batches(tokens[split:], dataclasses.replace(config, steps=1, seed=HELD_OUT_SEED))[0].to(device)
    records = []
    model.train()
    for step in range(1, config.steps + 1):
        refresh_partners(model, step)
        batch = train_batches[step - 1]
        logging = step % config.log_every == 0 or step == config.steps
        recorder.active = logging
        loss = model(input_ids=batch[:, :-1], labels=batch[:, 1:].contiguous()).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if logging:
            recorder.active = False
            with torch.no_grad():
                held_out_loss = model(
                    input_ids=held_out[:, :-1], labels=held_out[:, 1:].contiguous()
                ).loss.item()
            layers = [
                _layer_metrics(router, recorder.inputs[i], recorder.chosen[i], gatepro)
                for i, router in enumerate(routers)
            ]
            records.append(
                {"step": step, "loss": loss.item(), "held_out_loss": held_out_loss, "layers": layers}
            )
        if progress is not None:
            progress(step, config.steps, loss.item())
    if checkpoint_dir is not None:
        save_checkpoint(model.cpu(), checkpoint_dir)
    return records


def compare_tiny(
    config: TinyRunConfig, gatepro: GateProConfig, out_dir: str | None = None, echo=print
) -> dict:
    """Train baseline and GatePro from the same seed and data; print and return their metrics."""
    tokens = corpus_tokens(config.corpus)
    runs = {}
    for name, setting in (("baseline", gatepro.replace(enabled=False)), ("gatepro", gatepro)):
        started = time.monotonic()

        def progress(step, total, loss, name=name):
            if step % config.log_every == 0 or step == total:
                echo(f"[{name}] step {step}/{total} loss {loss:.4f}")

        runs[name] = train_tiny(config, setting, tokens, progress)
        echo(f"[{name}] trained in {time.monotonic() - started:.1f} s")
    result = {
        "tiny_run": dataclasses.asdict(config),
        "gatepro": dataclasses.asdict(gatepro),
        "corpus_modules": list(CORPUS_MODULES),
        "corpus_tokens": int(tokens.numel()),
        "corpus": config.corpus,
        "runs": runs,
    }
    echo(format_comparison(runs))
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "tiny_comparison.json")
        write_text_atomically(path, json.dumps(result, indent=2))
        echo(f"wrote {path}")
    return result


def _cell(value: float | int) -> str:
    return f"{value:>14d}" if isinstance(value, int) else f"{value:>14.4f}"


def format_comparison(runs: dict[str, list[dict]]) -> str:
    """A plain-text table of the final step: losses, then each layer's metrics, run by run."""
    names = list(runs)
    finals = [runs[name][-1] for name in names]
    header = f"{'metric (final step ' + str(finals[0]['step']) + ')':<34}" + "".join(f"{n:>14}" for n in names)
    lines = [header, "-" * len(header)]
    for key in ("loss", "held_out_loss"):
        lines.append(f"{key:<34}" + "".join(f"{final[key]:>14.4f}" for final in finals))
    for layer in range(len(finals[0]["layers"])):
        for key in LAYER_METRICS:
            values = "".join(_cell(final["layers"][layer][key]) for final in finals)
            lines.append(f"{'layer ' + str(layer) + ' ' + key:<34}{values}")
    return "\n".join(lines)
