"""A ``transformers.Trainer`` callback: GatePro's hot-swap schedule and its routing metrics.

``GateProTrainerCallback.attach(trainer, gatepro)`` patches the trainer's model when training
begins (every supported MoE family, ``patch_transformers(model=...)``) and, before every
optimizer step, sets GatePro on or off from the tokens (``Trainer`` counts them with
``include_num_input_tokens_seen``) or optimizer steps trained before that step; the Trainer
restores both from a checkpoint, so a resumed run is in exactly the state an uninterrupted one
would be. Cached partner tables are refreshed once per optimizer step. Every
``metrics_interval`` steps it tallies, over all micro-batches of that step and all ranks, each
MoE layer's zero-token count, load imbalance, flip rate, partner co-activation and boundary
margins below lambda, adds the gate similarity metrics, and logs them through ``Trainer.log``
(so ``report_to`` integrations get them) and, on the main process only, as one JSON line in
``<output_dir>/gatepro_metrics.jsonl``.
"""

import os

from transformers import TrainerCallback

from olmoe_gatepro.core.config import GateProRunConfig, check_run_config
from olmoe_gatepro.core.router_state import METRICS_FILE, begin_step, finish_step
from olmoe_gatepro.jsonl import append_record, drop_after_step
from olmoe_gatepro.transformers.patch import patch_transformers

__all__ = ["GateProTrainerCallback", "METRICS_FILE"]


class GateProTrainerCallback(TrainerCallback):
    """Apply ``gatepro``'s schedule to a ``Trainer``'s model and log routing metrics.

    Use ``GateProTrainerCallback.attach(trainer, gatepro)``: the callback logs through the
    trainer it is attached to.
    """

    def __init__(self, trainer, gatepro: GateProRunConfig, metrics_interval: int = 100):
        if isinstance(metrics_interval, bool) or not isinstance(metrics_interval, int) or metrics_interval < 1:
            raise ValueError(f"metrics_interval must be an int >= 1; got {metrics_interval!r}")
        self.trainer, self.gatepro, self.metrics_interval = trainer, gatepro, metrics_interval

    @classmethod
    def attach(cls, trainer, gatepro: GateProRunConfig, metrics_interval: int = 100) -> "GateProTrainerCallback":
        """A callback for ``trainer``, added to its callbacks."""
        check_run_config("GateProTrainerCallback.attach: gatepro", gatepro, trainer)
        switches_by_tokens = gatepro.schedule_unit == "tokens" and (gatepro.on_from_tokens or gatepro.off_after_tokens)
        if switches_by_tokens and trainer.args.include_num_input_tokens_seen == "no":
            raise ValueError("the GatePro schedule counts tokens: set TrainingArguments(include_num_input_tokens_seen="
                             "'all'), or schedule in steps (on_from_steps / off_after_steps)")
        callback = cls(trainer, gatepro, metrics_interval)
        trainer.add_callback(callback)
        return callback

    def _trained(self, state) -> int:
        """Tokens or optimizer steps trained before the step about to run."""
        return self.gatepro.trained(tokens=state.num_input_tokens_seen, steps=state.global_step)

    def _metrics_path(self, args) -> str:
        return os.path.join(args.output_dir, METRICS_FILE)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        patch_transformers(model=model, config=self.gatepro.router_config(self._trained(state)))
        if state.is_world_process_zero:
            drop_after_step(self._metrics_path(args), state.global_step)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        step = state.global_step + 1
        begin_step(model, enabled=self.gatepro.active_at(self._trained(state)), step=step,
                   record=step % self.metrics_interval == 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        recorded = finish_step(model)
        if recorded is None:
            return
        should_log = control.should_log  # Trainer.log clears it; the Trainer's own logging of this step must still run
        self.trainer.log({f"gatepro/layer_{index:02d}/{name}": value
                          for index, layer in enumerate(recorded["layers"]) for name, value in layer.items()})
        control.should_log = should_log
        if state.is_world_process_zero:
            append_record(self._metrics_path(args), {"step": state.global_step, "tokens": state.num_input_tokens_seen,
                                                     **recorded})
