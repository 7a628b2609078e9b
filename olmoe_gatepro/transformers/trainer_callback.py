"""A ``transformers.Trainer`` callback: GatePro's hot-swap schedule and its routing metrics.

``GateProTrainerCallback.attach(trainer, gatepro)`` patches the trainer's model when training
begins (every supported MoE family, ``patch_transformers(model=...)``) and, before every
optimizer step, sets GatePro on or off from the tokens (``Trainer`` counts them with
``include_num_input_tokens_seen``) or optimizer steps trained before that step; the Trainer
restores both from a checkpoint, so a resumed run is in exactly the state an uninterrupted one
would be. Cached partner tables are refreshed once per optimizer step. Every
``metrics_interval_steps`` steps it tallies, over all micro-batches of that step and all ranks, each
MoE layer's zero-token count, load imbalance, flip rate, partner co-activation and boundary
margins below lambda, adds the gate similarity metrics, and logs them through ``Trainer.log``
(so ``report_to`` integrations get them) and, on the main process only, as one JSON line in
``<output_dir>/gatepro_metrics.jsonl``.

Exact resume: transformers 5 keeps MoE experts fused in memory (``mlp.experts.gate_up_proj``)
while ``save_pretrained`` writes them per expert (``mlp.experts.0.gate_proj.weight``, ...), and
the stock ``Trainer`` loads a checkpoint's weights with a non-strict ``load_state_dict`` that
cannot match the two: it warns about missing and unexpected keys and trains on with the experts
it had. The callback makes the trainer it is attached to load a checkpoint's (or the best
model's) weights through ``from_pretrained``, the library's own conversion of the saved layout,
and copy them in strictly: a key that is missing, unexpected or of another shape is an error
naming the checkpoint. Optimizer, scheduler, RNG and data position are the Trainer's own.
"""

import os

import torch
from transformers import PreTrainedModel, TrainerCallback
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from olmoe_gatepro.core.checks import refuse_renamed
from olmoe_gatepro.core.config import GateProRunConfig, check_run_config
from olmoe_gatepro.core.router_state import METRICS_FILE, begin_step, finish_step
from olmoe_gatepro.jsonl import append_record, drop_after_step
from olmoe_gatepro.transformers.patch import patch_transformers

__all__ = ["GateProTrainerCallback", "METRICS_FILE", "load_checkpoint_weights"]

_WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)


def load_checkpoint_weights(model: torch.nn.Module, folder: str) -> None:
    """Copy the weights ``save_pretrained`` wrote into ``folder`` into ``model``, every one or none.

    The folder is read by ``from_pretrained`` (its conversion turns the saved per-expert layout
    into the fused one ``model`` holds) on the CPU in ``model``'s dtype, then copied in with a
    strict ``load_state_dict``, so ``model`` keeps its parameters (devices, identities). Raises
    ``ValueError`` naming ``folder`` and the keys when the checkpoint lacks a weight of ``model``,
    holds one ``model`` does not have, or holds one of another shape.
    """
    try:
        saved, info = type(model).from_pretrained(folder, dtype=model.dtype, device_map="cpu",
                                                  output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:  # RuntimeError: experts that do not stack
        raise ValueError(f"checkpoint {folder} does not hold exactly the weights of the model being trained, "
                         f"so it cannot be resumed: {error}") from None
    problems = {name: keys for name, keys in info.items() if keys}
    if not problems:
        try:
            model.load_state_dict(saved.state_dict(), strict=True)
        except RuntimeError as error:
            problems = {"load_state_dict": str(error)}
    if problems:
        raise ValueError(f"checkpoint {folder} does not hold exactly the weights of the model being trained, "
                         f"so it cannot be resumed: {problems}")


def _saved_by_save_pretrained(folder: str | None) -> bool:
    return folder is not None and any(os.path.isfile(os.path.join(folder, name)) for name in _WEIGHT_FILES)


def _resume_exactly(trainer) -> None:
    """Make ``trainer`` load checkpoint weights with ``load_checkpoint_weights``.

    Only where the stock Trainer would read ``save_pretrained`` files into a plain model; FSDP,
    DeepSpeed, SageMaker and adapter checkpoints keep the Trainer's own loading (they store the
    in-memory layout).
    """
    stock_load, stock_load_best = trainer._load_from_checkpoint, trainer._load_best_model

    def plain(model, folder) -> bool:
        wrapped = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled or getattr(model, "peft_config", None)
        return isinstance(model, PreTrainedModel) and not wrapped and _saved_by_save_pretrained(folder)

    def load_from_checkpoint(resume_from_checkpoint, model=None):
        target = trainer.model if model is None else model
        if plain(target, resume_from_checkpoint):
            load_checkpoint_weights(target, resume_from_checkpoint)
        else:
            stock_load(resume_from_checkpoint, model)

    def load_best_model():
        if plain(trainer.model, trainer.state.best_model_checkpoint):
            load_checkpoint_weights(trainer.model, trainer.state.best_model_checkpoint)
        else:
            stock_load_best()

    trainer._load_from_checkpoint, trainer._load_best_model = load_from_checkpoint, load_best_model


class GateProTrainerCallback(TrainerCallback):
    """Apply ``gatepro``'s schedule to a ``Trainer``'s model and log routing metrics.

    Use ``GateProTrainerCallback.attach(trainer, gatepro)``: the callback logs through the
    trainer it is attached to, and makes that trainer resume every weight of a checkpoint (or fail).
    """

    def __init__(self, trainer, gatepro: GateProRunConfig, metrics_interval_steps: int = 100, **renamed):
        refuse_renamed("GateProTrainerCallback", renamed)
        if isinstance(metrics_interval_steps, bool) or not isinstance(metrics_interval_steps, int) or metrics_interval_steps < 1:
            raise ValueError(f"metrics_interval_steps must be an int >= 1; got {metrics_interval_steps!r}")
        self.trainer, self.gatepro, self.metrics_interval_steps = trainer, gatepro, metrics_interval_steps
        _resume_exactly(trainer)

    @classmethod
    def attach(cls, trainer, gatepro: GateProRunConfig, metrics_interval_steps: int = 100,
               **renamed) -> "GateProTrainerCallback":
        """A callback for ``trainer``, added to its callbacks."""
        refuse_renamed("GateProTrainerCallback.attach", renamed)
        check_run_config("GateProTrainerCallback.attach: gatepro", gatepro, trainer)
        switches_by_tokens = gatepro.schedule_unit == "tokens" and (gatepro.on_from_tokens or gatepro.off_after_tokens)
        if switches_by_tokens and trainer.args.include_num_input_tokens_seen == "no":
            raise ValueError("the GatePro schedule counts tokens: set TrainingArguments(include_num_input_tokens_seen="
                             "'all'), or schedule in steps (on_from_steps / off_after_steps)")
        callback = cls(trainer, gatepro, metrics_interval_steps)
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
                   record=step % self.metrics_interval_steps == 0)

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
