"""Every PNG plot of the package: curves over training, comparison deltas, inspected routing.

The curve plots take ``curves.Curves``, one run's named series: routing metrics against the
step (``curves.routing_curves``; runs that share a label are seeds of one recipe and are
averaged), or learning curves against tokens trained (``learning_curves.py``).
"""

import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from olmoe_gatepro.evaluation.curves import Curves, layer_series, series_layers  # noqa: E402
from olmoe_gatepro.evaluation.learning_curves import LOSS_CURVE  # noqa: E402
from olmoe_gatepro.jsonl import atomic_file  # noqa: E402

__all__ = ["save_figure", "plot_zero_token_curves", "plot_coactivation_curves", "plot_diversity_curves",
           "plot_learning_curves", "plot_deltas", "plot_inspected_layers", "plot_coactivation_heatmaps"]

DIVERSITY_METRICS = (
    ("avg_cosine_similarity", "average cosine similarity"),
    ("avg_angle_deg", "average angle (degrees)"),
    ("spectral_entropy", "spectral entropy"),
)


def _mean_curves(runs: list[Curves], name: str) -> dict[str, tuple[list, list]]:
    """Series ``name`` of each label, averaged over the runs (seeds) sharing it, point by point."""
    grouped: dict[str, list[Curves]] = {}
    for run in runs:
        grouped.setdefault(run.label, []).append(run)
    curves = {}
    for label, seeds in grouped.items():
        steps = [step for step, _ in seeds[0].series[name]]
        values = [statistics.fmean(seed.series[name][i][1] for seed in seeds) for i in range(len(steps))]
        curves[label] = (steps, values)
    return curves


def _styles(runs: list[Curves]) -> dict[str, dict]:
    """Each label's line: one colour per colour group, dashed where asked."""
    groups = list(dict.fromkeys(run.colour or run.label for run in runs))
    colours = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    return {run.label: dict(color=colours(groups.index(run.colour or run.label)), linestyle="--" if run.dashed else "-",
                            label=run.label) for run in runs}


def _seeds_note(runs: list[Curves]) -> str:
    return " (mean over seeds)" if len({run.label for run in runs}) < len(runs) else ""


def _legend(figure, axis) -> None:
    handles, labels = axis.get_legend_handles_labels()
    figure.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)


def save_figure(figure, path: str, **savefig_args) -> None:
    """Write ``figure`` to ``path`` as a PNG atomically (``jsonl.atomic_file``: nothing half-written on a
    full disk) and close it."""
    try:
        with atomic_file(path, binary=True) as file:
            figure.savefig(file, format="png", dpi=110, **savefig_args)
    finally:
        plt.close(figure)


def _save(figure, path: str) -> None:
    save_figure(figure, path, bbox_inches="tight")


def _per_layer_curves(runs: list[Curves], path: str, metric: str, ylabel: str, title: str, chance=None) -> None:
    layers = series_layers(runs[0], metric)
    styles = _styles(runs)
    figure, axes = plt.subplots(
        1, len(layers), figsize=(4.2 * len(layers), 3.6), squeeze=False, constrained_layout=True
    )
    for layer, axis in zip(layers, axes[0]):
        for key, (steps, values) in _mean_curves(runs, layer_series(metric, layer)).items():
            axis.plot(steps, values, **styles[key])
        if chance is not None:
            axis.axhline(runs[0].series[layer_series(chance, layer)][0][1], color="grey", linestyle=":",
                         label="uniformly random top-k")
        axis.set_title(f"layer {layer}")
        axis.set_xlabel("step")
        axis.set_ylabel(ylabel)
    _legend(figure, axes[0][0])
    figure.suptitle(title + _seeds_note(runs))
    _save(figure, path)


def plot_zero_token_curves(runs: list[Curves], path: str) -> None:
    """Unused experts per batch over steps, one panel per layer (the paper's Figure 4)."""
    _per_layer_curves(runs, path, "zero_token_count", "experts with no token", "Zero-token count per batch")


def plot_coactivation_curves(runs: list[Curves], path: str) -> None:
    """Partner co-activation over steps against its uniformly random top-k level, one panel per layer."""
    _per_layer_curves(runs, path, "partner_coactivation", "chosen experts whose partner is chosen too",
                      "Partner co-activation", chance="partner_coactivation_chance")


def plot_diversity_curves(runs: list[Curves], path: str) -> None:
    """Cosine similarity, angle and spectral entropy over steps, first and last layer (Figure 5)."""
    num_layers = len(series_layers(runs[0], DIVERSITY_METRICS[0][0]))
    layers = sorted({0, num_layers - 1})
    styles = _styles(runs)
    figure, axes = plt.subplots(
        len(layers), len(DIVERSITY_METRICS), figsize=(13, 3.4 * len(layers)), squeeze=False,
        constrained_layout=True,
    )
    for row, layer in enumerate(layers):
        for column, (metric, title) in enumerate(DIVERSITY_METRICS):
            axis = axes[row][column]
            for key, (steps, values) in _mean_curves(runs, layer_series(metric, layer)).items():
                axis.plot(steps, values, **styles[key])
            axis.set_title(f"layer {layer}: {title}")
            axis.set_xlabel("step")
    _legend(figure, axes[0][0])
    figure.suptitle("Gate similarity" + _seeds_note(runs))
    _save(figure, path)


def _token_axis(tokens: float, _position=None) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(tokens) >= scale:
            return f"{tokens / scale:g}{unit}"
    return f"{tokens:g}"


def plot_learning_curves(runs: list[Curves], path: str) -> None:
    """One panel per curve (tasks first, then losses) against tokens trained; each run one colour, its
    GatePro switch points dotted."""
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


def plot_deltas(comparison: dict, path: str) -> None:
    """A forest plot of ``compare``'s result: per column, each row's delta with its 95% interval.

    The zero line is marked; a significant difference (``significant``, after the Holm
    adjustment) is drawn filled, the rest hollow; a circle is a method-level (seed) interval, a
    square a checkpoint-level (item) one. The paper's Table 2 delta is a red tick.
    """
    from olmoe_gatepro.evaluation.results import TASK_TITLES

    columns, rows = comparison["columns"], comparison["rows"][1:]
    figure, axes = plt.subplots(1, len(columns), figsize=(2.6 * len(columns), 0.9 + 0.45 * len(rows)),
                                squeeze=False, sharey=True, constrained_layout=True)
    positions = list(range(len(rows)))[::-1]
    for axis, column in zip(axes[0], columns):
        for y, row in zip(positions, rows):
            entry = row["columns"][column]
            axis.plot([entry["ci95_low"], entry["ci95_high"]], [y, y], color="tab:blue", linewidth=2)
            axis.plot([entry["delta"]], [y], marker="o" if entry["level"] == "method" else "s", color="tab:blue",
                      markerfacecolor="tab:blue" if entry["significant"] else "white")
            if entry.get("paper_delta") is not None:
                axis.plot([entry["paper_delta"]], [y], marker="|", markersize=14, color="tab:red")
        axis.axvline(0.0, color="black", linewidth=0.8)
        axis.set_title(TASK_TITLES[column])
        axis.set_xlabel("Δ points")
    axes[0][0].set_yticks(positions, [row["label"] for row in rows])
    axes[0][0].set_ylim(-0.7, len(rows) - 0.3)
    figure.suptitle(f"Difference to {comparison['baseline']} with 95% interval (filled: significant after Holm; "
                    "circle: seeds as the unit, square: these checkpoints' items; red: the paper's delta)")
    _save(figure, path)


def plot_inspected_layers(routing: dict, path: str) -> None:
    """``inspect``'s models per layer: partner co-activation against chance, zero-token count, load imbalance."""
    panels = (("partner_coactivation", "partner co-activation"), ("zero_token_count", "experts with no token"),
              ("load_imbalance", "load imbalance (max / mean)"))
    figure, axes = plt.subplots(1, len(panels), figsize=(13, 3.6), squeeze=False, constrained_layout=True)
    colours = plt.get_cmap("tab10")
    for column, (metric, title) in enumerate(panels):
        axis = axes[0][column]
        for index, model in enumerate(routing["models"]):
            layers = [layer["layer"] for layer in model["layers"]]
            axis.plot(layers, [layer[metric] for layer in model["layers"]], marker="o", color=colours(index % 10),
                      label=model["label"])
            if metric == "partner_coactivation":
                axis.plot(layers, [layer["partner_coactivation_chance"] for layer in model["layers"]], linestyle=":",
                          color=colours(index % 10), label=f"{model['label']}: uniformly random top-k")
        axis.set_title(title)
        axis.set_xlabel("MoE layer")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(figure, axes[0][0])
    figure.suptitle("Routing per layer")
    _save(figure, path)


def plot_coactivation_heatmaps(model: dict, path: str) -> None:
    """One model's co-activation (share of tokens choosing both experts) in its first, middle and last MoE layer."""
    import numpy as np

    layers = model["layers"]
    picked = sorted({0, len(layers) // 2, len(layers) - 1})
    figure, axes = plt.subplots(1, len(picked), figsize=(4.4 * len(picked), 4.0), squeeze=False,
                                constrained_layout=True)
    for axis, index in zip(axes[0], picked):
        matrix = np.array(layers[index]["coactivation_matrix"], dtype=float)
        np.fill_diagonal(matrix, np.nan)  # an expert with itself is its load, shown elsewhere
        image = axis.imshow(matrix / model["tokens"], cmap="viridis")
        partners = layers[index]["partners"]
        axis.scatter(partners, range(len(partners)), marker="x", s=12, color="red", label="most similar expert j*(i)")
        axis.set_title(f"layer {index}")
        axis.set_xlabel("expert")
        axis.set_ylabel("expert")
        figure.colorbar(image, ax=axis, shrink=0.8)
    axes[0][0].legend(loc="upper left", bbox_to_anchor=(0.0, -0.15), fontsize=8)
    figure.suptitle(f"{model['label']}: share of tokens choosing both experts (row i, x: j*(i))")
    _save(figure, path)
