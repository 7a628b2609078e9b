"""An OLMo-core trainer callback: GatePro's hot-swap schedule and its routing metrics.

``GateProCallback`` patches the trained model's routers when training starts and, before every
step, sets GatePro on or off from the number of tokens (or steps) trained before that step, so a run
resumed from a checkpoint is in exactly the state an uninterrupted one would be. Every
``metrics_interval_steps`` steps it records, per MoE layer, zero-token count, load imbalance, GatePro
flip rate, partner co-activation and the fraction of tokens whose top-k boundary margin is below
lambda (all over the whole global batch of that step) and the gate similarity metrics, via
``trainer.record_metric`` (so console, W&B and Comet callbacks get them) and as one JSON line in
``<save_folder>/gatepro_metrics.jsonl``. ``InterruptCallback`` tells which signal cancelled a run.
"""

import functools
import os
import signal
import sys
from dataclasses import InitVar, dataclass, field
from typing import ClassVar

import torch
import torch.distributed as dist
from olmo_core.train.callbacks import Callback, EvaluatorCallback

from olmoe_gatepro.core.checks import check_int, refuse_renamed
from olmoe_gatepro.core.config import GateProRunConfig, check_run_config
from olmoe_gatepro.core.router_state import METRICS_FILE, begin_step, finish_step
from olmoe_gatepro.jsonl import append_record, drop_after_step
from olmoe_gatepro.olmo_core.patch import patch_olmo_core

__all__ = ["GateProCallback", "MetricsFileCallback", "InterruptCallback", "METRICS_FILE"]


@dataclass
class GateProCallback(Callback):
    """Apply ``gatepro``'s schedule to the trainer's model and record routing metrics."""

    # Before the checkpointer (priority 1): a step's record is in the metrics file before its
    # checkpoint is saved, so a run killed once that checkpoint is complete resumes with it.
    priority: ClassVar[int] = 2
    gatepro: GateProRunConfig = field(default_factory=GateProRunConfig)
    metrics_interval_steps: int = 100
    metrics_file: str = METRICS_FILE
    metrics_interval: InitVar[None] = None  # the old name, refused with a pointer to the new one

    def __post_init__(self, metrics_interval) -> None:
        refuse_renamed("GateProCallback", {} if metrics_interval is None else {"metrics_interval": metrics_interval})
        check_run_config("GateProCallback.gatepro", self.gatepro)
        check_int("GateProCallback.metrics_interval_steps", self.metrics_interval_steps, minimum=1)
        if not isinstance(self.metrics_file, str) or os.path.basename(self.metrics_file) != self.metrics_file \
                or not self.metrics_file.strip():
            raise ValueError(f"GateProCallback.metrics_file must be a file name in the save folder; got {self.metrics_file!r}")

    @property
    def _model(self) -> torch.nn.Module:
        return self.trainer.train_module.model

    @property
    def _metrics_path(self) -> str:
        return os.path.join(str(self.trainer.save_folder), self.metrics_file)

    def pre_train(self) -> None:
        trained = self.gatepro.trained(tokens=self.trainer.global_train_tokens_seen, steps=self.trainer.global_step)
        patch_olmo_core(model=self._model, config=self.gatepro.router_config(trained))
        if _is_rank_zero():
            drop_after_step(self._metrics_path, self.trainer.global_step)

    def pre_step(self, batch) -> None:
        batch_tokens = self.trainer.data_loader.global_num_tokens_in_batch(batch) or 0
        tokens_before_step = self.trainer.global_train_tokens_seen - batch_tokens
        step = self.trainer.global_step
        trained = self.gatepro.trained(tokens=tokens_before_step, steps=step - 1)
        begin_step(self._model, enabled=self.gatepro.active_at(trained), step=step, record=step % self.metrics_interval_steps == 0)

    def post_train_batch(self) -> None:
        recorded = finish_step(self._model)
        if recorded is None:
            return
        for index, layer in enumerate(recorded["layers"]):
            for name, value in layer.items():
                self.trainer.record_metric(f"layer {index:02d}/{name}", value, namespace="gatepro")
        if _is_rank_zero():
            append_record(self._metrics_path, {"step": self.trainer.global_step,
                                               "tokens": self.trainer.global_train_tokens_seen, **recorded})


@dataclass
class MetricsFileCallback(Callback):
    """Every metric the trainer records, appended to ``<save_folder>/<file_name>`` as JSON lines.

    One line per logging event, ``{"step": N, "<metric>": value, ...}``, in step order; a step's
    metrics can span several lines (OLMo-core reports throughput and checkpoint timings apart
    from the losses), so merge lines by step. Written by rank 0, each line appended whole and
    fsynced; on resuming, lines of steps after the checkpoint are dropped, so the file always
    describes one run. Curves can be drawn from it without any tracking service.
    """

    file_name: str = "metrics.jsonl"

    @property
    def _path(self) -> str:
        return os.path.join(str(self.trainer.save_folder), self.file_name)

    def pre_train(self) -> None:
        if _is_rank_zero():
            drop_after_step(self._path, self.trainer.global_step)

    def log_metrics(self, step: int, metrics: dict) -> None:
        if _is_rank_zero():
            append_record(self._path, {"step": step, **{name: float(value) for name, value in metrics.items()}})


@dataclass
class InterruptCallback(Callback):
    """Remember the signal (SIGINT, SIGTERM) with which OLMo-core's trainer cancelled the run.

    OLMo-core's own handlers stay in charge: a signal cancels the run, the ranks agree on it at
    the trainer's next cancel check (the trainer should check every step) and the checkpointer
    saves the step reached. This callback wraps those handlers to record ``signal_number``; a
    second SIGINT raises ``KeyboardInterrupt`` at once (no checkpoint); and a cancelled run skips
    the evaluations meant for the end of training.
    """

    priority: ClassVar[int] = 2  # post_train before the evaluators'
    signal_number: int | None = None

    def pre_train(self) -> None:
        self.signal_number = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            cancel = signal.getsignal(signum)  # the trainer's, installed by fit() before pre_train
            if callable(cancel):
                signal.signal(signum, functools.partial(self._received, cancel))

    def _received(self, cancel, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal_number == signal.SIGINT:
            signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt
        if self.signal_number is None:
            self.signal_number = signum
            if signum == signal.SIGINT and _is_rank_zero():
                print("interrupted: stopping at the next step with a checkpoint of it (Ctrl-C again to stop at once)",
                      file=sys.stderr, flush=True)
        cancel(signum, frame)

    def post_train(self) -> None:
        if self.trainer.is_canceled:
            for callback in self.trainer.callbacks.values():
                if isinstance(callback, EvaluatorCallback):
                    callback.eval_on_finish = False


def _is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
