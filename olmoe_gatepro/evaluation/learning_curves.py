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
from dataclasses import dataclass, field

from olmoe_gatepro.evaluation.results import RESULT_FILES, load_result
from olmoe_gatepro.jsonl import read_step_records

__all__ = ["RunCurves", "TRAIN_LOSS", "switch_tokens", "curves_from_metrics", "curves_from_records",
           "curves_from_checkpoint_results",
           "load_run_curves", "to_csv", "plot_learning_curves", "write_learning_curves"]

DOWNSTREAM = re.compile(r"eval/downstream/(?P<task>.+) \((?P<metric>(length-normalized |PMI-DC )?accuracy v2|F1 score v2)\)")
HELD_OUT = re.compile(r"eval/lm/(?P<label>.+)/CE loss")
TRAIN_LOSS = "train/CE loss"
LOSS_CURVE = re.compile(r"held-out( .+)? loss|training loss")


@dataclass
class RunCurves:
    """One run's curves: ``series[name]`` is ``[(tokens, value), ...]`` in token order."""

    label: str
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)  # tokens -> step
    switches: tuple[int, ...] = ()  # tokens at which GatePro switched on or off


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


def _collect(curves: RunCurves, points: list[tuple[str, int, int, float]]) -> RunCurves:
    """``curves`` with ``points`` (name, step, tokens, value) added; of two at one point the later wins."""
    by_name: dict[str, dict[int, float]] = {}
    for name, step, tokens, value in points:
        by_name.setdefault(name, {})[tokens] = value
        curves.steps[tokens] = step
    curves.series = {name: sorted(values.items()) for name, values in by_name.items()}
    return curves


def curves_from_metrics(folder: str, label: str) -> RunCurves:
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
    return _collect(RunCurves(label, switches=switch_tokens(dataclasses.asdict(run.gatepro), tokens_per_step)), points)


def curves_from_records(records: list[dict], label: str, tokens_per_step: int) -> RunCurves:
    """The training and held-out loss of a tiny run's records (``tiny_run.train_tiny``, one per logged step)."""
    points = [(name, record["step"], record["step"] * tokens_per_step, float(record[key]))
              for record in records for key, name in (("loss", "training loss"), ("held_out_loss", "held-out loss"))
              if key in record]
    return _collect(RunCurves(label), points)


def _curve_name(metric: str) -> str | None:
    if metric == TRAIN_LOSS:
        return "training loss"
    if match := DOWNSTREAM.fullmatch(metric):
        return match["task"]
    if match := HELD_OUT.fullmatch(metric):
        return f"held-out {match['label']} loss"
    return None


def curves_from_checkpoint_results(folder: str, label: str | None = None, suite: str = "lm-eval") -> RunCurves:
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
    curves = RunCurves(label or results[0]["label"],
                       switches=tuple(results[0]["checkpoint"].get("gatepro_switch_tokens") or ()))
    points = [(_task_curve(task, result["suite"]), result["checkpoint"]["step"], result["checkpoint"]["tokens"],
               entry["score"]) for result in results for task, entry in result["tasks"].items()]
    return _collect(curves, sorted(points, key=lambda point: point[2]))


def _task_curve(task: str, suite: str) -> str:
    """A task's panel: the in-loop format shares the training metrics' panel; other suites score other items."""
    return task if suite == "olmo-in-loop" else f"{task} ({suite})"


def load_run_curves(folder: str, label: str, suite: str = "lm-eval") -> RunCurves:
    """The curves of ``folder``: an OLMo-core save folder, or a per-checkpoint evaluation folder of ``suite``."""
    from olmoe_gatepro.olmo_core.run_config import RUN_CONFIG_FILE

    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: no such folder")
    if os.path.isfile(os.path.join(folder, RUN_CONFIG_FILE)):
        return curves_from_metrics(folder, label)
    return curves_from_checkpoint_results(folder, label, suite)


def to_csv(runs: list[RunCurves]) -> str:
    """One row per point: run, curve, step, tokens, value."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", "curve", "step", "tokens", "value"])
    for run in runs:
        for name, points in run.series.items():
            writer.writerows([run.label, name, run.steps[tokens], tokens, repr(value)] for tokens, value in points)
    return buffer.getvalue()


def _token_axis(tokens: float, _position=None) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(tokens) >= scale:
            return f"{tokens / scale:g}{unit}"
    return f"{tokens:g}"


def plot_learning_curves(runs: list[RunCurves], path: str) -> None:
    """One panel per curve (tasks first, then losses); each run one colour, its switch points dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    from olmoe_gatepro.evaluation.plots import save_figure

    names = list(dict.fromkeys(name for run in runs for name in run.series))
    names.sort(key=lambda name: bool(LOSS_CURVE.fullmatch(name)))
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows + 0.6), squeeze=False,
                                layout="constrained")
    colours = plt.get_cmap("tab10")
    for axis, name in zip(axes.flat, names):
        for index, run in enumerate(runs):
            if name in run.series:
                tokens, values = zip(*run.series[name])
                axis.plot(tokens, values, marker="o", markersize=3, color=colours(index % 10), label=run.label)
            for switch in run.switches:
                axis.axvline(switch, color=colours(index % 10), linestyle=":", linewidth=1)
        axis.set_title(name)
        axis.set_ylabel("loss" if LOSS_CURVE.fullmatch(name) else "score")
        axis.set_xlabel("tokens trained")
        axis.xaxis.set_major_formatter(FuncFormatter(_token_axis))
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(names):]:
        axis.set_visible(False)
    legend = {}  # label -> handle, over all panels: a run may lack the first panel's curve
    for axis in axes.flat:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    note = " (dotted: GatePro switched on/off)" if any(run.switches for run in runs) else ""
    figure.legend(handles, labels, loc="outside upper center", ncol=min(len(runs), 2 * columns), frameon=False,
                  title=f"learning curves{note}")
    save_figure(figure, path)


def write_learning_curves(runs: list[RunCurves], out_dir: str) -> list[str]:
    """``learning_curves.png`` and ``learning_curves.csv`` in ``out_dir``; their paths."""
    from olmoe_gatepro.jsonl import write_text_atomically

    if not any(run.series for run in runs):
        raise ValueError("no curve to draw: the runs logged no in-loop evaluation, held-out or training loss")
    os.makedirs(out_dir, exist_ok=True)
    png, table = os.path.join(out_dir, "learning_curves.png"), os.path.join(out_dir, "learning_curves.csv")
    plot_learning_curves(runs, png)
    write_text_atomically(table, to_csv(runs))
    return [png, table]
