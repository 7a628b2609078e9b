"""Continue training an existing MoE checkpoint with ``transformers.Trainer``, GatePro on or off.

The paper's largest gains are in continued training (Table 1, the "CT stage"). One call trains
one arm: a Hugging Face folder or hub id (OLMoE, Qwen-MoE, FlexOlmo, Mixtral, ...) continues
on token files (OLMo-core's flat format) or text files (tokenised with the model's tokenizer),
cut into windows of ``sequence_length``, for ``train_tokens`` tokens, with
``GateProTrainerCallback`` applying GatePro (or only recording what it would change, for the
baseline arm). The run folder holds the Trainer's checkpoints (a rerun resumes from the
latest), ``gatepro_metrics.jsonl``, and at the end ``hf/``, the continued model with its
tokenizer and ``continued_training.json`` (what was done), renamed into place when complete.
Evaluate and compare the arms with ``eval``, ``compare`` and ``inspect`` (README: "Continued
training").
"""

import dataclasses
import glob
import json
import math
import os
import shutil
from dataclasses import dataclass

import torch

from olmoe_gatepro.core.config import GateProRunConfig
from olmoe_gatepro.checkpoints import cannot_load, check_model_files
from olmoe_gatepro.jsonl import write_text_atomically
from olmoe_gatepro.data import document_token_ids, iter_documents, read_token_file

__all__ = ["ContinuedTraining", "continue_training", "RECORD_FILE"]

RECORD_FILE = "continued_training.json"


@dataclass(frozen=True)
class ContinuedTraining:
    """One continued-training arm.

    ``data``: token files (``.npy``, raw ``tokens_dtype`` or ``numpy.save``) or text / ``.jsonl``
    files, not mixed. ``gatepro``: its schedule; ``enabled=False`` is the baseline arm.
    """

    model: str
    data: tuple[str, ...]
    train_tokens: int
    gatepro: GateProRunConfig
    revision: str | None = None
    tokens_dtype: str = "uint16"
    sequence_length: int = 2048
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    seed: int = 0
    metrics_interval: int = 10
    bf16: bool = False

    def __post_init__(self) -> None:
        for name in ("train_tokens", "sequence_length", "batch_size", "gradient_accumulation_steps", "metrics_interval"):
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
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be finite and > 0; got {self.learning_rate!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0; got {self.warmup_steps}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must lie in [0, 2^32); got {self.seed}")


def _token_stream(spec: ContinuedTraining, tokenizer, needed: int) -> torch.Tensor:
    """The first ``needed`` tokens of the data (files in the order given)."""
    if spec.data[0].endswith(".npy"):
        parts, count = [], 0
        for path in spec.data:
            tokens = read_token_file(path, spec.tokens_dtype, flag="--data")
            parts.append(torch.from_numpy(tokens[: needed - count].astype("int64")))
            count += parts[-1].numel()
            if count >= needed:
                break
        return torch.cat(parts)
    documents = (document for path in spec.data for document in iter_documents(path))
    return torch.tensor(document_token_ids(documents, tokenizer, needed), dtype=torch.long)


def continue_training(spec: ContinuedTraining, out_dir: str) -> dict:
    """Train ``spec`` into ``out_dir`` (resuming from its latest checkpoint); return the record of ``hf/``.

    Under ``torchrun``/``accelerate`` every process runs this; the optimizer steps are
    ``train_tokens / (sequence_length * batch_size * accumulation * WORLD_SIZE)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from olmoe_gatepro.transformers.trainer_callback import GateProTrainerCallback

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    tokens_per_step = spec.sequence_length * spec.batch_size * spec.gradient_accumulation_steps * world_size
    steps = spec.train_tokens // tokens_per_step
    if steps < 1:
        raise ValueError(f"train_tokens {spec.train_tokens} is less than one optimizer step ({tokens_per_step} tokens: "
                         "sequence_length x batch_size x accumulation x processes)")
    final = os.path.join(out_dir, "hf")
    if os.path.exists(final):
        raise FileExistsError(f"{final} already exists: this arm is done; choose another --out")
    check_model_files(spec.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.model, revision=spec.revision)
        model = AutoModelForCausalLM.from_pretrained(spec.model, revision=spec.revision,
                                                     dtype=torch.bfloat16 if spec.bf16 else torch.float32)
    except (OSError, ValueError) as error:
        raise cannot_load(spec.model, error) from None
    stream = _token_stream(spec, tokenizer, steps * tokens_per_step)
    if int(stream.max()) >= model.config.vocab_size:
        raise ValueError(f"data: token id {int(stream.max())} is outside {spec.model}'s vocabulary "
                         f"({model.config.vocab_size} ids)")
    windows = stream[: stream.numel() // spec.sequence_length * spec.sequence_length].view(-1, spec.sequence_length)
    if windows.numel() < steps * tokens_per_step:
        raise ValueError(f"data: {stream.numel()} tokens, fewer than the {steps * tokens_per_step} to train on; "
                         "give more data or fewer --train-tokens")
    args = TrainingArguments(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps, learning_rate=spec.learning_rate,
        warmup_steps=spec.warmup_steps, lr_scheduler_type="cosine", save_steps=max(1, min(500, steps // 4)),
        save_total_limit=2, logging_steps=spec.metrics_interval, report_to="none", seed=spec.seed, data_seed=spec.seed,
        include_num_input_tokens_seen="all", bf16=spec.bf16, use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": w, "labels": w} for w in windows])
    GateProTrainerCallback.attach(trainer, spec.gatepro, metrics_interval=spec.metrics_interval)
    resume = bool(glob.glob(os.path.join(out_dir, "checkpoint-*")))
    trainer.train(resume_from_checkpoint=True if resume else None)
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
