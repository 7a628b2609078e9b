"""Continue training an existing MoE checkpoint with ``transformers.Trainer``, GatePro on or off.

The paper's largest gains are in continued training (Table 1, the "CT stage"). One call trains
one arm: a Hugging Face folder or hub id (OLMoE, Qwen-MoE, FlexOlmo, Mixtral, ...) continues
on token files (OLMo-core's flat format) or text files (tokenised with the model's tokenizer),
cut into windows of ``sequence_length``, for ``max_tokens`` tokens, with
``GateProTrainerCallback`` applying GatePro (or only recording what it would change, for the
baseline arm). The run folder holds ``continue_settings.json`` (the settings, written first), the
Trainer's checkpoints, ``gatepro_metrics.jsonl``, and at the end ``hf/``, the continued model
with its tokenizer and ``continued_training.json`` (what was done), renamed into place when
complete. Evaluate and compare the arms with ``eval``, ``compare`` and ``inspect`` (README:
"Continued training").

Resuming: a rerun into the folder resumes from the latest checkpoint with every weight (see
``GateProTrainerCallback``), the optimizer, scheduler, RNG and data position, and ends with the
weights an uninterrupted run ends with; it is refused, naming the keys, when its settings differ
from the recorded ones (``report_to`` alone may change). Ctrl-C stops after the optimizer step
under way with a checkpoint of it (a second Ctrl-C stops at once) and raises
``KeyboardInterrupt``. Precision: the weights and AdamW's state are float32; ``bf16`` adds
bfloat16 autocast (the Trainer's ``bf16=True``), so updates far below bfloat16's spacing still
move the weights; ``hf/`` holds the float32 weights.
"""

import contextlib
import dataclasses
import glob
import json
import math
import os
import shutil
import signal
import sys
import threading
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from olmoe_gatepro.core.config import GateProRunConfig
from olmoe_gatepro.checkpoints import cannot_load, check_model_files
from olmoe_gatepro.jsonl import keep_settings, write_text_atomically
from olmoe_gatepro.data import document_token_ids, iter_documents, read_token_file

__all__ = ["ContinuedTraining", "optimizer_steps", "continue_training", "RECORD_FILE", "SETTINGS_FILE"]

RECORD_FILE = "continued_training.json"
SETTINGS_FILE = "continue_settings.json"


@dataclass(frozen=True)
class ContinuedTraining:
    """One continued-training arm.

    ``data``: token files (``.npy``, raw ``token_dtype`` or ``numpy.save``) or text / ``.jsonl``
    files, not mixed. ``gatepro``: its schedule; ``enabled=False`` is the baseline arm.
    ``report_to``: the Trainer's integrations (``"none"``, ``"all"``, ``"wandb"``, ...).
    """

    model: str
    data: tuple[str, ...]
    max_tokens: int
    gatepro: GateProRunConfig
    revision: str | None = None
    token_dtype: str = "uint16"
    sequence_length: int = 2048
    micro_batch_sequences: int = 4
    gradient_accumulation_steps: int = 1
    lr: float = 1e-5
    warmup_tokens: int = 0
    seed: int = 0
    metrics_interval_steps: int = 10
    bf16: bool = False
    report_to: tuple[str, ...] = ("none",)

    def __post_init__(self) -> None:
        for name in ("max_tokens", "sequence_length", "micro_batch_sequences", "gradient_accumulation_steps", "metrics_interval_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "sequence_length" else 1):
                raise ValueError(f"{name} must be an int >= {2 if name == 'sequence_length' else 1}; got {value!r}")
        if not self.data:
            raise ValueError("data: give at least one token file or text file")
        kinds = {path.endswith(".npy") for path in self.data}
        if len(kinds) > 1:
            raise ValueError(f"data: token files (.npy) and text files cannot be mixed; got {list(self.data)}")
        missing = [path for path in self.data if not os.path.isfile(path)]
        if missing:
            raise ValueError(f"data: no such file {missing[0]}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be finite and > 0; got {self.lr!r}")
        if self.warmup_tokens < 0:
            raise ValueError(f"warmup_tokens must be >= 0; got {self.warmup_tokens}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must lie in [0, 2^32); got {self.seed}")
        _check_report_to(self.report_to)


def _check_report_to(report_to: tuple[str, ...]) -> None:
    """Refuse integrations transformers does not know or that are not installed, before a model loads."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    if isinstance(report_to, str) or not report_to:
        raise ValueError(f"report_to must be a non-empty tuple of names; got {report_to!r}")
    if len(report_to) > 1 and {"none", "all"} & set(report_to):
        raise ValueError(f"report_to: 'none' and 'all' stand alone; got {list(report_to)}")
    installed = get_available_reporting_integrations()
    for name in report_to:
        if name not in ("none", "all", *INTEGRATION_TO_CALLBACK):
            raise ValueError(f"report_to: unknown integration {name!r}; transformers knows none, all, "
                             f"{', '.join(INTEGRATION_TO_CALLBACK)}")
        if name not in ("none", "all") and name not in installed:
            raise ValueError(f"report_to: {name} is not installed here (installed: {', '.join(installed) or 'none'})")


class _StopOnInterrupt(TrainerCallback):
    """Ctrl-C (SIGINT) ends training after the optimizer step under way, with a checkpoint of it.

    Install the handler with ``handling_sigint()`` around ``Trainer.train``. Under
    ``torch.distributed`` the ranks agree on stopping (one all-reduce of a flag per optimizer
    step), so that all stop after the same step. A second Ctrl-C raises ``KeyboardInterrupt`` at once.
    """

    def __init__(self):
        self.interrupted = False

    @contextlib.contextmanager
    def handling_sigint(self):
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _handle(self, signum, frame) -> None:
        self.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("interrupted: stopping after this optimizer step with a checkpoint of it (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor(float(self.interrupted), device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            self.interrupted = bool(flag.item())
        if self.interrupted:
            control.should_save = control.should_training_stop = True


def _token_stream(spec: ContinuedTraining, tokenizer, needed: int) -> torch.Tensor:
    """The first ``needed`` tokens of the data (files in the order given)."""
    if spec.data[0].endswith(".npy"):
        parts, count = [], 0
        for path in spec.data:
            tokens = read_token_file(path, spec.token_dtype, flag="--data")
            parts.append(torch.from_numpy(tokens[: needed - count].astype("int64")))
            count += parts[-1].numel()
            if count >= needed:
                break
        return torch.cat(parts)
    documents = (document for path in spec.data for document in iter_documents(path))
    return torch.tensor(document_token_ids(documents, tokenizer, needed), dtype=torch.long)


def optimizer_steps(spec: ContinuedTraining, world_size: int) -> tuple[int, int, int]:
    """(tokens per optimizer step, steps in ``max_tokens``, steps in ``warmup_tokens`` rounded up) on ``world_size``
    processes; a ValueError when ``max_tokens`` is less than one step."""
    tokens_per_step = spec.sequence_length * spec.micro_batch_sequences * spec.gradient_accumulation_steps * world_size
    steps = spec.max_tokens // tokens_per_step
    if steps < 1:
        raise ValueError(f"max_tokens {spec.max_tokens} is less than one optimizer step ({tokens_per_step} tokens: "
                         "sequence_length x micro_batch_sequences x accumulation x processes)")
    return tokens_per_step, steps, -(-spec.warmup_tokens // tokens_per_step)


def continue_training(spec: ContinuedTraining, out_dir: str) -> dict:
    """Train ``spec`` into ``out_dir`` (resuming from its latest checkpoint); return the record of ``hf/``.

    Under ``torchrun``/``accelerate`` every process runs this; the optimizer steps are
    ``max_tokens / (sequence_length * micro_batch_sequences * accumulation * WORLD_SIZE)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from olmoe_gatepro.transformers.trainer_callback import GateProTrainerCallback

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tokens_per_step, steps, warmup_steps = optimizer_steps(spec, world_size)
    final = os.path.join(out_dir, "hf")
    if os.path.exists(final):
        raise FileExistsError(f"{final} already exists: this arm is done; choose another --out")
    settings = {**dataclasses.asdict(spec), "processes": world_size}
    del settings["report_to"]  # where the metrics go may change on resuming; what is trained may not
    settings_path = os.path.join(out_dir, SETTINGS_FILE)
    keep_settings(settings_path, settings, write=False)  # a rerun with other settings stops before loading
    check_model_files(spec.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.model, revision=spec.revision)
        model = AutoModelForCausalLM.from_pretrained(spec.model, revision=spec.revision, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise cannot_load(spec.model, error) from None
    stream = _token_stream(spec, tokenizer, steps * tokens_per_step)
    if int(stream.max()) >= model.config.vocab_size:
        raise ValueError(f"data: token id {int(stream.max())} is outside {spec.model}'s vocabulary "
                         f"({model.config.vocab_size} ids)")
    windows = stream[: stream.numel() // spec.sequence_length * spec.sequence_length].view(-1, spec.sequence_length)
    if windows.numel() < steps * tokens_per_step:
        raise ValueError(f"data: {stream.numel()} tokens, fewer than the {steps * tokens_per_step} to train on; "
                         "give more data or fewer --max-tokens")
    args = TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=spec.micro_batch_sequences,
        gradient_accumulation_steps=spec.gradient_accumulation_steps, learning_rate=spec.lr,
        warmup_steps=warmup_steps, lr_scheduler_type="cosine", save_steps=max(1, min(500, steps // 4)),
        save_total_limit=2, logging_steps=spec.metrics_interval_steps, report_to=list(spec.report_to), seed=spec.seed,
        data_seed=spec.seed,
        include_num_input_tokens_seen="all", bf16=spec.bf16, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        keep_settings(settings_path, settings)
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": w, "labels": w} for w in windows])
    GateProTrainerCallback.attach(trainer, spec.gatepro, metrics_interval_steps=spec.metrics_interval_steps)
    stopper = _StopOnInterrupt()
    trainer.add_callback(stopper)
    resume = bool(glob.glob(os.path.join(out_dir, "checkpoint-*")))
    with stopper.handling_sigint():
        trainer.train(resume_from_checkpoint=True if resume else None)
    if stopper.interrupted:
        print(f"stopped at step {trainer.state.global_step} of {steps} with a checkpoint; rerun the same command "
              "to continue", file=sys.stderr, flush=True)
        raise KeyboardInterrupt
    record = {"base_model": spec.model, "revision": spec.revision, "steps": steps,
              "tokens": trainer.state.num_input_tokens_seen, "settings": dataclasses.asdict(spec)}
    partial = f"{final}.partial"
    if trainer.is_world_process_zero():
        shutil.rmtree(partial, ignore_errors=True)
    trainer.save_model(partial)  # every process joins (sharded models are gathered); the main one writes
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(partial)
        write_text_atomically(os.path.join(partial, RECORD_FILE), json.dumps(record, indent=2))
        os.replace(partial, final)
    return record
