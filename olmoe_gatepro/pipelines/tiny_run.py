"""Train a tiny transformers OLMoE on the CPU with and without GatePro and compare routing.

The corpus is built locally with no network: the UTF-8 bytes of the source of a fixed list of
Python standard-library modules, tokenised byte by byte (vocabulary 256), so a step costs
little. Both runs start from the same initial weights and see the same batches; only the
GatePro setting differs. Training goes through ``transformers.Trainer`` with
``GateProTrainerCallback`` (AdamW, betas 0.9/0.95, weight decay 0.01 off norms and biases,
constant learning rate, no clipping), fed the drawn batches in order.

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
import os
import sysconfig
import tempfile
import time

import torch
from torch import nn

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

from olmoe_gatepro.core.config import GateProConfig, GateProRunConfig
from olmoe_gatepro.jsonl import read_records, write_text_atomically
from olmoe_gatepro.data import byte_tokenizer
from olmoe_gatepro.interrupts import raise_if_interrupted
from olmoe_gatepro.pipelines.presets import CORPUS_MODULES, TinyRunConfig
from olmoe_gatepro.transformers.trainer_callback import METRICS_FILE, GateProTrainerCallback

__all__ = [
    "deterministic_cpu",
    "corpus_tokens",
    "build_tiny_olmoe",
    "save_checkpoint",
    "train_tiny",
    "compare_tiny",
    "format_comparison",
]

HELD_OUT_SEED = 1234  # the held-out batch is the same for every run and seed
LAYER_METRICS = (
    "avg_cosine_similarity",
    "avg_angle_deg",
    "spectral_entropy",
    "zero_token_count",
    "load_imbalance",
    "load_entropy",
    "flip_rate",
    "partner_coactivation",
    "partner_coactivation_chance",
    "margin_below_penalty",
    "routed_tokens",
)


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
        hidden_size=config.d_model,
        intermediate_size=config.expert_hidden_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_heads,
        num_experts=config.num_experts,
        num_experts_per_tok=config.top_k,
        max_position_embeddings=max(config.sequence_length, 4096),  # RoPE: lets lm-eval score long prompts
        router_aux_loss_coef=config.lb_loss_weight,
        output_router_logits=config.lb_loss_weight > 0,
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
    """(steps, global_batch_sequences, sequence_length) windows of ``tokens`` in a seeded random order."""
    generator = torch.Generator().manual_seed(config.seed)
    if tokens.numel() <= config.sequence_length:
        raise ValueError(f"sequence_length ({config.sequence_length}) must be shorter than the corpus part it is drawn from "
                         f"({tokens.numel()} tokens of corpus {config.corpus!r})")
    starts = torch.randint(
        0, tokens.numel() - config.sequence_length, (config.steps, config.global_batch_sequences), generator=generator
    )
    return tokens[starts.unsqueeze(-1) + torch.arange(config.sequence_length)]


class _InOrder(torch.utils.data.IterableDataset):
    """The drawn windows, step after step: the Trainer gets exactly these batches in this order."""

    def __init__(self, batches: torch.Tensor):
        self.batches = batches

    def __iter__(self):
        for window in self.batches.reshape(-1, self.batches.shape[-1]):
            yield {"input_ids": window, "labels": window}


class _LossRecorder(TrainerCallback):
    """At each logged step: the Trainer's mean training loss since the last one, and the held-out loss."""

    def __init__(self, held_out: torch.Tensor, metrics_interval_steps: int):
        self.held_out, self.metrics_interval_steps = held_out, metrics_interval_steps
        self.losses: dict[int, dict[str, float]] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.metrics_interval_steps:
            return
        model.eval()
        with torch.no_grad():
            held_out = model(input_ids=self.held_out, labels=self.held_out).loss.item()
        model.train()
        self.losses[state.global_step] = {"held_out_loss": held_out}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and state.global_step in self.losses:
            self.losses[state.global_step]["loss"] = float(logs["loss"])


class _RaiseIfInterrupted(TrainerCallback):
    """A Ctrl-C that Python swallowed during the step (``olmoe_gatepro.interrupts``) stops training at its end."""

    def on_step_end(self, args, state, control, **kwargs):
        raise_if_interrupted()


def train_tiny(
    config: TinyRunConfig,
    gatepro: GateProConfig,
    tokens: torch.Tensor,
    progress=None,
    checkpoint_dir: str | None = None,
) -> list[dict]:
    """Train one tiny OLMoE with ``transformers.Trainer`` and ``GateProTrainerCallback``.

    Returns a record per logged step (every ``metrics_interval_steps``): the mean training loss since the
    previous one, the held-out loss and the callback's per-layer routing metrics.
    ``gatepro.enabled = False`` is the baseline; its flip rate tells what GatePro with the
    other settings of ``gatepro`` would change in the baseline's routing. With
    ``checkpoint_dir`` the trained model is saved there (stock keys, byte tokenizer). On the
    CPU it runs inside ``deterministic_cpu()``.
    """
    context = deterministic_cpu() if torch.device(config.device).type == "cpu" else contextlib.nullcontext()
    with context, tempfile.TemporaryDirectory(prefix="olmoe-gatepro-tiny-") as output_dir:
        return _train(config, gatepro, tokens, progress, checkpoint_dir, output_dir)


def _train(config, gatepro, tokens, progress, checkpoint_dir, output_dir) -> list[dict]:
    from transformers import Trainer, TrainingArguments

    split = int(tokens.numel() * 0.9)
    held_out = _batches(tokens[split:], dataclasses.replace(config, steps=1, metrics_interval_steps=1, seed=HELD_OUT_SEED))[0]
    model = build_tiny_olmoe(config)
    args = TrainingArguments(
        output_dir=output_dir, max_steps=config.steps, per_device_train_batch_size=config.global_batch_sequences,
        learning_rate=config.lr, adam_beta2=0.95, weight_decay=0.01, lr_scheduler_type="constant",
        max_grad_norm=0.0, save_strategy="no", logging_steps=config.metrics_interval_steps, report_to="none", seed=config.seed,
        use_cpu=torch.device(config.device).type == "cpu", disable_tqdm=True, log_level="error",
    )
    trainer = Trainer(model=model, args=args, train_dataset=_InOrder(_batches(tokens[:split], config)))
    schedule = GateProRunConfig(**dataclasses.asdict(gatepro))
    GateProTrainerCallback.attach(trainer, schedule, metrics_interval_steps=config.metrics_interval_steps)
    losses = _LossRecorder(held_out.to(trainer.args.device), config.metrics_interval_steps)
    trainer.add_callback(losses)
    trainer.add_callback(_RaiseIfInterrupted())
    trainer.remove_callback(PrinterCallback)
    if progress is not None:
        trainer.add_callback(_Progress(progress, config.steps))
    trainer.train()
    records = [{"step": line["step"], **losses.losses[line["step"]], "layers": line["layers"]}
               for line in read_records(os.path.join(output_dir, METRICS_FILE))]
    if checkpoint_dir is not None:
        save_checkpoint(trainer.model.cpu(), checkpoint_dir)
    return records


class _Progress(TrainerCallback):
    def __init__(self, progress, steps: int):
        self.progress, self.steps = progress, steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.progress(state.global_step, self.steps, float(logs["loss"]))


def compare_tiny(
    config: TinyRunConfig, gatepro: GateProConfig, out_dir: str | None = None, echo=print
) -> dict:
    """Train baseline and GatePro from the same seed and data; print and return their metrics."""
    tokens = corpus_tokens(config.corpus)
    runs = {}
    for name, setting in (("baseline", gatepro.replace(enabled=False)), ("gatepro", gatepro)):
        started = time.monotonic()

        def progress(step, total, loss, name=name):
            if step % config.metrics_interval_steps == 0 or step == total:
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
