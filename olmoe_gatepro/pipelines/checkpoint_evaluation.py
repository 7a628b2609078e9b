"""Evaluate every checkpoint of a run, one result each, for learning curves: ``eval --each-checkpoint``.

Checkpoints: the complete ``stepN`` folders of an OLMo-core save folder (tokens = N x the run's
tokens per step, GatePro switch points from its ``run_config.json``), or hub revisions named as
OLMoE's intermediate checkpoints, ``stepN-tokensMB`` (tokens = M billion, as the name rounds it).
Each lands in ``<out>/<stepN or revision>/`` as ``eval`` writes it, with a ``checkpoint`` entry
(step, tokens, switch points); a checkpoint whose result is there already is skipped, so a rerun
picks up new checkpoints of a run still training.
"""

import dataclasses
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from olmoe_gatepro.checkpoints import complete_steps
from olmoe_gatepro.evaluation.learning_curves import curves_from_checkpoint_results, switch_tokens, write_learning_curves
from olmoe_gatepro.evaluation.results import RESULT_FILES, write_evaluation

__all__ = ["Checkpoint", "run_checkpoints", "revision_checkpoints", "evaluate_checkpoints"]

REVISION = re.compile(r"step(?P<step>\d+)-tokens(?P<billions>\d+)B")


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint to evaluate: ``model`` is an OLMo-core step folder, a Hugging Face folder or hub id."""

    name: str  # its folder under the output folder
    model: str
    revision: str | None
    step: int
    tokens: int
    switches: tuple[int, ...] = ()

    @property
    def is_olmo_core(self) -> bool:
        return self.revision is None and os.path.isdir(os.path.join(self.model, "model_and_optim"))


def run_checkpoints(save_folder: str) -> list[Checkpoint]:
    """The complete checkpoints of an OLMo-core save folder, in step order."""
    from olmoe_gatepro.olmo_core.run_config import ConfigError, load_run_config
    from olmoe_gatepro.olmo_core.run_config import RUN_CONFIG_FILE

    config = os.path.join(save_folder, RUN_CONFIG_FILE)
    if not os.path.isfile(config):
        raise ValueError(f"{save_folder}: no {RUN_CONFIG_FILE}, not an olmoe-gatepro training save folder")
    try:
        run = load_run_config(config)
    except ConfigError as error:
        raise ValueError(str(error)) from None
    switches = switch_tokens(dataclasses.asdict(run.gatepro), run.train.tokens_per_step)
    steps = complete_steps(save_folder)
    if not steps:
        raise ValueError(f"{save_folder} holds no complete checkpoint (stepN folder)")
    return [Checkpoint(f"step{step}", os.path.join(save_folder, f"step{step}"), None, step,
                       step * run.train.tokens_per_step, switches) for step in steps]


def revision_checkpoints(model: str, revisions: list[str]) -> list[Checkpoint]:
    """Hub revisions of ``model`` named ``stepN-tokensMB`` (as OLMoE-1B-7B-0924's), in token order."""
    checkpoints = []
    for revision in revisions:
        match = REVISION.fullmatch(revision)
        if match is None:
            raise ValueError(f"--revision {revision}: cannot tell the tokens trained from the name "
                             "(expected stepN-tokensMB, as allenai/OLMoE-1B-7B-0924's revisions)")
        checkpoints.append(Checkpoint(revision, model, revision, int(match["step"]), int(match["billions"]) * 10**9))
    if len({checkpoint.name for checkpoint in checkpoints}) < len(checkpoints):
        raise ValueError(f"--revision lists a revision twice: {revisions}")
    return sorted(checkpoints, key=lambda checkpoint: checkpoint.tokens)


def evaluate_checkpoints(checkpoints: list[Checkpoint], out_dir: str, suite: str, label: str,
                         evaluate: Callable[[str, str | None], tuple[dict, list[dict]]], echo=print) -> list[str]:
    """Evaluate each checkpoint not yet done with ``evaluate(model folder or id, revision)``; draw the curves.

    Returns the paths of the learning-curve files. An OLMo-core checkpoint is converted into a
    temporary folder first (removed afterwards).
    """
    from olmoe_gatepro.olmo_core.convert import convert_checkpoint

    for checkpoint in checkpoints:
        folder = os.path.join(out_dir, checkpoint.name)
        if os.path.isfile(os.path.join(folder, RESULT_FILES[suite])):
            echo(f"{checkpoint.name}: done already, skipped")
            continue
        echo(f"{checkpoint.name}: evaluating ({checkpoint.tokens:,} tokens trained)")
        with tempfile.TemporaryDirectory(prefix="olmoe-gatepro-eval-") as scratch:
            model = checkpoint.model
            if checkpoint.is_olmo_core:
                model = os.path.join(scratch, "hf")
                convert_checkpoint(checkpoint.model, model)
            result, items = evaluate(model, checkpoint.revision)
        result["model"] = checkpoint.model
        result["checkpoint"] = {"step": checkpoint.step, "tokens": checkpoint.tokens,
                                "gatepro_switch_tokens": list(checkpoint.switches)}
        write_evaluation(folder, suite, result, items)
    return write_learning_curves([curves_from_checkpoint_results(out_dir, label, suite)], out_dir)
