"""Should the tiny CPU trainings (smoke, study, reproduce) run through ``transformers.Trainer``?

Times the smoke's training (``tiny_run.train_tiny``, a plain loop) against the same model,
batch size, optimizer and steps under ``Trainer`` with ``GateProTrainerCallback``, both
single-threaded and deterministic (``deterministic_cpu``), alternating, and prints the ratio
of the medians. Issue #15 keeps the loop if Trainer is more than 20% slower.

    python benchmarks/tiny_trainer_vs_loop.py [--steps 60] [--repeats 3]
"""

import argparse
import statistics
import tempfile
import time

from transformers import Trainer, TrainingArguments

from olmoe_gatepro.core.config import GateProConfig, GateProRunConfig
from olmoe_gatepro.pipelines.reproduce import PRESETS
from olmoe_gatepro.pipelines.tiny_run import build_tiny_olmoe, corpus_tokens, deterministic_cpu, train_tiny
from olmoe_gatepro.transformers.trainer_callback import GateProTrainerCallback


def loop_seconds(config, tokens) -> float:
    started = time.perf_counter()
    train_tiny(config, GateProConfig(), tokens)
    return time.perf_counter() - started


def trainer_seconds(config, tokens) -> float:
    windows = tokens[: (tokens.numel() // (config.seq_len + 1)) * (config.seq_len + 1)].reshape(-1, config.seq_len + 1)
    dataset = [{"input_ids": window[:-1], "labels": window[1:]} for window in windows]
    with tempfile.TemporaryDirectory() as out, deterministic_cpu():
        started = time.perf_counter()
        model = build_tiny_olmoe(config)
        args = TrainingArguments(output_dir=out, max_steps=config.steps, per_device_train_batch_size=config.batch_size,
                                 learning_rate=config.learning_rate, adam_beta2=0.95, lr_scheduler_type="constant",
                                 weight_decay=0.01, max_grad_norm=0.0, save_strategy="no", report_to="none",
                                 use_cpu=True, disable_tqdm=True, logging_steps=config.log_every, seed=config.seed)
        trainer = Trainer(model=model, args=args, train_dataset=dataset)
        GateProTrainerCallback.attach(trainer, GateProRunConfig(enabled=True), metrics_interval=config.log_every)
        trainer.train()
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = PRESETS["smoke"].run.__class__(**{**PRESETS["smoke"].run.__dict__, "steps": args.steps})
    tokens = corpus_tokens(config.corpus)
    loop, trainer = [], []
    for _ in range(args.repeats):
        loop.append(loop_seconds(config, tokens))
        trainer.append(trainer_seconds(config, tokens))
    print(f"smoke model, {config.steps} steps, batch {config.batch_size} x {config.seq_len}, one thread")
    print(f"plain loop: median {statistics.median(loop):.2f} s {[round(s, 2) for s in loop]}")
    print(f"Trainer + GateProTrainerCallback: median {statistics.median(trainer):.2f} s {[round(s, 2) for s in trainer]}")
    print(f"Trainer / loop: {statistics.median(trainer) / statistics.median(loop):.3f}")


if __name__ == "__main__":
    main()
