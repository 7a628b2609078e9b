"""Learning curves: in-loop task scores and held-out loss against tokens trained, runs on the same axes.

A run's curves come from one of two folders:

- an OLMo-core save folder (``olmoe-gatepro train``): ``run_config.json`` and the metrics file of
  its ``callbacks:`` section. Curves: each downstream task's accuracy (the metric the task is
  scored by, ``eval/downstream/<task> (<accuracy> v2)``), each held-out set's loss
  (``eval/lm/<label>/CE loss``) and the training loss, at ``step x tokens per step``;
- a per-checkpoint evaluation folder (``olmoe-gatepro eval --each-checkpoint``): one result per
  checkpoint, each carrying its ``checkpoint`` (step and tokens). Curves: each task's score, named
  ``<task>`` for the OLMo in-loop suite (the panel of the in-loop scores: same format and data)
  and ``<task> (<suite>)`` for lm-eval's, which scores other items.

The GatePro switch points of a hot-swap schedule (the paper's Table 3) are marked on the plot.
"""

import csv
import dataclasses
import io
import os
import re
from olmoe_gatepro.evaluation.curves import Curves
from olmoe_gatepro.evaluation.results import RESULT_FILES, load_result
from olmoe_gatepro.jsonl import read_step_records

__all__ = ["TRAIN_LOSS", "LOSS_CURVE", "switch_tokens", "curves_from_metrics", "curves_from_records",
           "curves_from_checkpoint_results", "load_run_curves", "to_csv", "write_learning_curves"]

DOWNSTREAM = re.compile(r"eval/downstream/(?P<task>.+) \((?P<metric>(length-normalized |PMI-DC )?accuracy v2|F1 score v2)\)")
HELD_OUT = re.compile(r"eval/lm/(?P<label>.+)/CE loss")
TRAIN_LOSS = "train/CE loss"
LOSS_CURVE = re.compile(r"held-out( .+)? loss|training loss")


def switch_tokens(gatepro: dict, tokens_per_step: int | None) -> tuple[int, ...]:
    """Where a ``gatepro:`` run block (as a dict) switches GatePro on or off, in tokens trained."""
    if not gatepro.get("enabled"):
        return ()
    scale = 1
    on, off = gatepro.get("on_from_tokens") or 0, gatepro.get("off_after_tokens")
    if gatepro.get("on_from_steps") is not None or gatepro.get("off_after_steps") is not None:
        if tokens_per_step is None:
            return ()
        on, off, scale = gatepro.get("on_from_steps") or 0, gatepro.get("off_after_steps"), tokens_per_step
    return tuple(value * scale for value in (on, off) if value)


def _collect(curves: Curves, points: list[tuple[str, int, int, float]]) -> Curves:
    """``curves`` with ``points`` (name, step, tokens, value) added; of two at one point the later wins."""
    by_name: dict[str, dict[int, float]] = {}
    for name, step, tokens, value in points:
        by_name.setdefault(name, {})[tokens] = value
        curves.steps[tokens] = step
    curves.series = {name: sorted(values.items()) for name, values in by_name.items()}
    return curves


def curves_from_metrics(folder: str, label: str) -> Curves:
    """The curves of an OLMo-core save folder (see the module docstring)."""
    from olmoe_gatepro.olmo_core.run_config import ConfigError, load_run_config
    from olmoe_gatepro.olmo_core.run_config import RUN_CONFIG_FILE

    try:
        run = load_run_config(os.path.join(folder, RUN_CONFIG_FILE))
    except ConfigError as error:
        raise ValueError(str(error)) from None
    if run.callbacks.metrics_file is None:
        raise ValueError(f"{folder}: the run wrote no metrics file (callbacks.metrics_file is null)")
    path = os.path.join(folder, run.callbacks.metrics_file)
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: the run has not logged any metrics yet")
    tokens_per_step = run.train.tokens_per_step
    points = [(name, record["step"], record["step"] * tokens_per_step, float(value))
              for record in read_step_records(path) for key, value in record.items()
              if (name := _curve_name(key)) is not None and isinstance(value, (int, float))]
    return _collect(Curves(label, switches=switch_tokens(dataclasses.asdict(run.gatepro), tokens_per_step)), points)


def curves_from_records(records: list[dict], label: str, tokens_per_step: int) -> Curves:
    """The training and held-out loss of a tiny run's records (``tiny_run.train_tiny``, one per logged step)."""
    points = [(name, record["step"], record["step"] * tokens_per_step, float(record[key]))
              for record in records for key, name in (("loss", "training loss"), ("held_out_loss", "held-out loss"))
              if key in record]
    return _collect(Curves(label), points)


def _curve_name(metric: str) -> str | None:
    if metric == TRAIN_LOSS:
        return "training loss"
    if match := DOWNSTREAM.fullmatch(metric):
        return match["task"]
    if match := HELD_OUT.fullmatch(metric):
        return f"held-out {match['label']} loss"
    return None


def curves_from_checkpoint_results(folder: str, label: str | None = None, suite: str = "lm-eval") -> Curves:
    """The curves of a per-checkpoint evaluation folder: ``<folder>/<checkpoint>/<suite's result file>``."""
    results = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name, RESULT_FILES[suite])
        if os.path.isfile(path):
            result = load_result(path, suite)
            if not isinstance(result.get("checkpoint"), dict):
                raise ValueError(f"{path}: no checkpoint entry (step, tokens); not written by eval --each-checkpoint")
            results.append(result)
    if not results:
        raise ValueError(f"{folder}: neither a training save folder (run_config.json) nor per-checkpoint results "
                         f"(<checkpoint>/{RESULT_FILES[suite]})")
    curves = Curves(label or results[0]["label"],
                       switches=tuple(results[0]["checkpoint"].get("gatepro_switch_tokens") or ()))
    points = [(_task_curve(task, result["suite"]), result["checkpoint"]["step"], result["checkpoint"]["tokens"],
               entry["score"]) for result in results for task, entry in result["tasks"].items()]
    return _collect(curves, sorted(points, key=lambda point: point[2]))


def _task_curve(task: str, suite: str) -> str:
    """A task's panel: the in-loop format shares the training metrics' panel; other suites score other items."""
    return task if suite == "olmo-in-loop" else f"{task} ({suite})"


def load_run_curves(folder: str, label: str, suite: str = "lm-eval") -> Curves:
    """The curves of ``folder``: an OLMo-core save folder, or a per-checkpoint evaluation folder of ``suite``."""
    from olmoe_gatepro.olmo_core.run_config import RUN_CONFIG_FILE

    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: no such folder")
    if os.path.isfile(os.path.join(folder, RUN_CONFIG_FILE)):
        return curves_from_metrics(folder, label)
    return curves_from_checkpoint_results(folder, label, suite)


def to_csv(runs: list[Curves]) -> str:
    """One row per point: run, curve, step, tokens, value."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", "curve", "step", "tokens", "value"])
    for run in runs:
        for name, points in run.series.items():
            writer.writerows([run.label, name, run.steps[tokens], tokens, repr(value)] for tokens, value in points)
    return buffer.getvalue()


def write_learning_curves(runs: list[Curves], out_dir: str) -> list[str]:
    """``learning_curves.png`` and ``learning_curves.csv`` in ``out_dir``; their paths."""
    from olmoe_gatepro.jsonl import write_text_atomically

    if not any(run.series for run in runs):
        raise ValueError("no curve to draw: the runs logged no in-loop evaluation, held-out or training loss")
    os.makedirs(out_dir, exist_ok=True)
    png, table = os.path.join(out_dir, "learning_curves.png"), os.path.join(out_dir, "learning_curves.csv")
    from olmoe_gatepro.evaluation.plots import plot_learning_curves

    plot_learning_curves(runs, png)
    write_text_atomically(table, to_csv(runs))
    return [png, table]
