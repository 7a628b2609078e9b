"""A tiny OLMoE trained by ``transformers.Trainer`` with ``GateProTrainerCallback``, for the tests.

Run as a script under ``torch.distributed.run`` (2 CPU processes, gloo) it trains and writes,
per rank, the GatePro metrics that rank logged through ``Trainer.log`` into ``<out>/rank<r>.json``.
"""

import json
import os
import sys

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from olmoe_gatepro.core.config import GateProRunConfig
from olmoe_gatepro.pipelines.presets import TinyRunConfig
from olmoe_gatepro.pipelines.tiny_run import build_tiny_olmoe, corpus_tokens, deterministic_cpu
from olmoe_gatepro.transformers.trainer_callback import GateProTrainerCallback

SEQ_LEN, BATCH, ACCUMULATION = 16, 2, 2
TOKENS_PER_STEP = SEQ_LEN * BATCH * ACCUMULATION  # per process


class _StopAt(TrainerCallback):
    """Stops training after ``step`` (a crash after a checkpoint, without killing the test process)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def dataset(count: int = 64) -> list[dict]:
    windows = corpus_tokens()[: count * SEQ_LEN].reshape(count, SEQ_LEN)
    return [{"input_ids": window, "labels": window.clone()} for window in windows]


def train(out: str, gatepro: GateProRunConfig, steps: int = 6, stop_at: int | None = None, resume=None,
          metrics_interval_steps: int = 1) -> Trainer:
    """Train (or resume) a tiny OLMoE in ``out`` for ``steps`` optimizer steps; checkpoints every 3."""
    with deterministic_cpu():
        model = build_tiny_olmoe(TinyRunConfig(n_layers=2, num_experts=8, top_k=2, d_model=32, n_heads=2,
                                               expert_hidden_size=16, sequence_length=SEQ_LEN))
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=ACCUMULATION, learning_rate=1e-3, save_steps=3, logging_steps=1,
            report_to="none", use_cpu=True, include_num_input_tokens_seen="all", seed=0, data_seed=0, disable_tqdm=True,
            ddp_backend="gloo" if "LOCAL_RANK" in os.environ else None, save_only_model=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset())
        GateProTrainerCallback.attach(trainer, gatepro, metrics_interval_steps=metrics_interval_steps)
        if stop_at is not None:
            trainer.add_callback(_StopAt(stop_at))
        trainer.train(resume_from_checkpoint=resume)
    return trainer


if __name__ == "__main__":
    out = sys.argv[1]
    trainer = train(out, GateProRunConfig(enabled=True, penalty=0.05, on_from_steps=2), steps=4)
    logged = [{key: value for key, value in entry.items() if key.startswith("gatepro/") or key == "step"}
              for entry in trainer.state.log_history if any(key.startswith("gatepro/") for key in entry)]
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with open(os.path.join(out, f"rank{rank}.json"), "w") as file:
        json.dump(logged, file)
