"""Did GatePro make a difference? Results side by side, with paired statistics and a verdict.

Rows: each is one model, or a group of seeds of one arm (``--group gatepro=runs/g0,runs/g1``);
the first row is the baseline. Per column (the paper's tasks in its order, then their average),
each row against the baseline gets:

- the delta in points, with a 95% confidence interval from a paired bootstrap over items (the
  average: stratified by task), and a p-value: the exact McNemar test for one binary task, the
  paired sign-flip permutation test for clustered items (MMLU's prompt variants), for the
  average and for seed-averaged groups (``paired_stats``);
- for groups, each group's seed standard deviation, and the spread of the difference across
  seeds; an effect must clear both the item-level test and this run-to-run noise;
- the smallest difference this sample size can detect.

Results without a per-item file (older ones) fall back to the unpaired standard error, and
the table says so. Writes ``table.md`` (verdict first, then the table and, for run folders with
training metrics, how much GatePro changed routing), ``table.csv``, ``comparison.json``,
``deltas.png`` (a forest plot) and, where training metrics exist, the routing plots.
"""

import csv
import io
import json
import math
import os
import statistics
from dataclasses import dataclass

import numpy as np

from olmoe_gatepro.core.router_state import METRICS_FILE
from olmoe_gatepro.evaluation import paired_stats
from olmoe_gatepro.evaluation.results import TASK_TITLES, TASKS, load_result, load_samples
from olmoe_gatepro.jsonl import read_records, write_text_atomically

__all__ = ["METRICS_FILE", "Arm", "load_arms", "compare_arms", "routing_summary", "to_markdown", "to_csv", "compare"]

_Z95 = 1.959963984540054


@dataclass
class Arm:
    """A row of the comparison: one or more runs (seeds) of one model, with their per-item outcomes."""

    label: str
    paths: list[str]
    results: list[dict]
    samples: list[dict] | None  # per run: {task: {item: (cluster, correct)}}; None if any run lacks them


def _load_arm(label: str, paths: list[str], suite: str) -> Arm:
    results = [load_result(path, suite) for path in paths]
    samples = [load_samples(result) for result in results]
    return Arm(label, paths, results, None if any(s is None for s in samples) else samples)


def load_arms(groups: dict[str, list[str]], suite: str = "lm-eval") -> list[Arm]:
    """Load every run of every group (label -> run folders or result files); the first is the baseline.

    Refuses a result given twice and results that cannot be compared, naming the files.
    """
    arms = [_load_arm(label, paths, suite) for label, paths in groups.items()]
    sources: dict[str, str] = {}
    for arm in arms:
        for result in arm.results:
            if result["_source"] in sources:
                raise ValueError(f"{result['_source']} is given twice (as {sources[result['_source']]} and "
                                 f"{arm.label}); compare each result once")
            sources[result["_source"]] = arm.label
    _check_comparable([result for arm in arms for result in arm.results])
    return arms


def _check_comparable(results: list[dict]) -> None:
    baseline = results[0]
    for other in results[1:]:
        for key, what in (("suite", "task suites"), ("limit", "sample limits")):
            if other.get(key) != baseline.get(key):
                raise ValueError(
                    f"refusing to compare results evaluated with different {what}: "
                    f"{baseline['_source']} has {key}={baseline.get(key)!r}, "
                    f"{other['_source']} has {key}={other.get(key)!r}"
                )
        if set(other["tasks"]) != set(baseline["tasks"]):
            raise ValueError(
                f"refusing to compare results on different tasks: {baseline['_source']} has "
                f"{sorted(baseline['tasks'])}, {other['_source']} has {sorted(other['tasks'])}"
            )


def _mean_correct(arm: Arm, task: str) -> dict[str, float]:
    """{item: fraction of the arm's runs that got it right}; every run must hold the same items."""
    first = arm.samples[0][task]
    for run, result in zip(arm.samples[1:], arm.results[1:]):
        if set(run[task]) != set(first):
            raise ValueError(f"{result['_source']} and {arm.results[0]['_source']} scored different {task} items; "
                             "evaluate every run on the same data and limit")
    return {item: sum(run[task][item][1] for run in arm.samples) / len(arm.samples) for item in first}


def _paired_task(baseline: Arm, other: Arm, task: str) -> paired_stats.PairedTask:
    base, model = _mean_correct(baseline, task), _mean_correct(other, task)
    if set(base) != set(model):
        raise ValueError(f"{baseline.results[0]['_source']} and {other.results[0]['_source']} scored different "
                         f"{task} items; evaluate both on the same data and limit")
    clusters: dict[str, list[float]] = {}
    for item, (cluster, _) in baseline.samples[0][task].items():
        clusters.setdefault(cluster, []).append(model[item] - base[item])
    ordered = [clusters[name] for name in sorted(clusters)]
    return paired_stats.PairedTask(np.array([sum(d) for d in ordered]), np.array([float(len(d)) for d in ordered]))


def _scores(arm: Arm, tasks: list[str]) -> list[dict[str, float]]:
    """Per run, percent score per task and their average."""
    runs = []
    for result in arm.results:
        scores = {task: 100 * result["tasks"][task]["score"] for task in tasks}
        scores["avg"] = statistics.fmean(scores[task] for task in tasks)
        runs.append(scores)
    return runs


def _stderr(result: dict, tasks: list[str]) -> dict[str, float]:
    """Percent standard errors of one result (NaN where unknown), the average's included."""
    stderrs = {task: math.nan if result["tasks"][task]["stderr"] is None else 100 * result["tasks"][task]["stderr"]
               for task in tasks}
    stderrs["avg"] = math.sqrt(sum(stderrs[task] ** 2 for task in tasks)) / len(tasks)
    return stderrs


def _normal_p(delta: float, stderr: float) -> float:
    if math.isnan(stderr) or stderr == 0:
        return math.nan
    return math.erfc(abs(delta) / stderr / math.sqrt(2))


def _column_stats(baseline: Arm, other: Arm, tasks: list[str], columns: list[str]) -> dict[str, dict]:
    base_runs, other_runs = _scores(baseline, tasks), _scores(other, tasks)
    stats = {}
    if baseline.samples is not None and other.samples is not None:
        paired = {task: _paired_task(baseline, other, task) for task in tasks}
        for column in columns:
            chosen = [paired[column]] if column != "avg" else [paired[task] for task in tasks]
            test = paired_stats.paired_test(chosen)
            stats[column] = {key: 100 * test[key] if key in ("delta", "ci95_low", "ci95_high") else test[key]
                             for key in test}
        items = {task: len(paired[task].diffs) for task in tasks}
    else:
        base_se, other_se = _stderr(baseline.results[0], tasks), _stderr(other.results[0], tasks)
        for column in columns:
            delta = statistics.fmean(r[column] for r in other_runs) - statistics.fmean(r[column] for r in base_runs)
            spread = math.hypot(base_se[column], other_se[column])
            stats[column] = {"delta": delta, "ci95_low": delta - _Z95 * spread, "ci95_high": delta + _Z95 * spread,
                             "p_value": _normal_p(delta, spread), "test": "unpaired z (no per-item results)"}
        items = {task: baseline.results[0]["tasks"][task]["samples"] for task in tasks}
    for column in columns:
        chosen = tasks if column == "avg" else [column]
        base_scores = [statistics.fmean(r[task] for r in base_runs) / 100 for task in chosen]
        stats[column]["n"] = sum(items[task] for task in chosen)
        stats[column]["smallest_detectable_difference"] = 100 * paired_stats.smallest_detectable_difference(
            base_scores, [items[task] for task in chosen])
        stats[column]["seed_spread"] = _seed_spread(base_runs, other_runs, column)
        stats[column]["significant"] = _is_effect(stats[column])
    return stats


def _seed_spread(base_runs: list[dict], other_runs: list[dict], column: str) -> float | None:
    """Standard error of the difference of two groups' means from their seeds (None without 2+ each)."""
    if len(base_runs) < 2 or len(other_runs) < 2:
        return None
    variance = sum(statistics.variance([r[column] for r in runs]) / len(runs) for runs in (base_runs, other_runs))
    return math.sqrt(variance)


def _is_effect(column: dict) -> bool:
    """p < 0.05 and, where seeds measure it, a delta beyond 1.96 times the seed spread."""
    if math.isnan(column["p_value"]) or column["p_value"] >= paired_stats.ALPHA:
        return False
    return column["seed_spread"] is None or abs(column["delta"]) > _Z95 * column["seed_spread"]


def compare_arms(arms: list[Arm], out_dir: str = ".") -> dict:
    """The comparison as a JSON-ready dict: method, and per row and column scores and statistics.

    Runs are named by their result files' paths relative to ``out_dir``, so a report folder
    moved with its runs, or made twice in two places, says the same.
    """
    tasks = [task for task in TASKS if task in arms[0].results[0]["tasks"]]
    columns = tasks + ["avg"]
    rows = []
    for index, arm in enumerate(arms):
        runs = _scores(arm, tasks)
        row = {
            "label": arm.label,
            "runs": [os.path.relpath(result["_source"], out_dir) for result in arm.results],
            "gatepro": [result.get("gatepro") for result in arm.results],
            "paired": arm.samples is not None and arms[0].samples is not None,
            "columns": {},
        }
        stderrs = _stderr(arm.results[0], tasks)
        stats = _column_stats(arms[0], arm, tasks, columns) if index else {}
        for column in columns:
            values = [run[column] for run in runs]
            entry = {
                "score": statistics.fmean(values),
                "stderr": None if len(values) > 1 or math.isnan(stderrs[column]) else stderrs[column],
                "seed_sd": statistics.stdev(values) if len(values) > 1 else None,
                "seeds": len(values),
            }
            entry.update(stats.get(column, {}))
            row["columns"][column] = entry
        rows.append(row)
    return {
        "baseline": arms[0].label,
        "suite": arms[0].results[0]["suite"],
        "limit": arms[0].results[0].get("limit"),
        "columns": columns,
        "units": "percentage points",
        "method": {
            "ci95": f"percentile interval of a paired bootstrap over items, {paired_stats.RESAMPLES} resamples, "
                    f"seed {paired_stats.SEED}; the average is resampled within each task",
            "p_value": "exact McNemar (one binary task); paired sign-flip permutation, "
                       f"{paired_stats.RESAMPLES} resamples (clustered items, the average, groups of seeds)",
            "items": "MMLU's prompt variants of one question (in-loop suite) are one item",
            "effect": "p < 0.05 and, with 2+ seeds per group, |delta| > 1.96 x the seed spread",
            "smallest_detectable_difference": "two-sided 5% test, 80% power, 2 p (1 - p) / n per task",
        },
        "rows": rows,
    }


def _title(column: str) -> str:
    return TASK_TITLES[column]


def _points(value: float) -> str:
    if value >= 100:
        return "over 100"  # too few items to detect even the largest possible difference
    return f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def _verdict(row: dict, columns: list[str], baseline: str) -> str:
    stats = row["columns"]
    found, within_noise, none = [], [], []
    for column in columns:
        entry = stats[column]
        if entry["significant"]:
            direction = "better" if entry["delta"] > 0 else "worse"
            found.append(f"{direction} on {_title(column)} by {abs(entry['delta']):.2f} points "
                         f"(95% CI {entry['ci95_low']:+.2f} to {entry['ci95_high']:+.2f}, p = {entry['p_value']:.3g})")
        elif not math.isnan(entry["p_value"]) and entry["p_value"] < paired_stats.ALPHA:
            within_noise.append(f"{_title(column)} ({entry['delta']:+.2f} points, p = {entry['p_value']:.3g}, "
                                f"seed spread ± {entry['seed_spread']:.2f})")
        else:
            none.append(column)
    sentences, lead = [], f"**{row['label']}** vs {baseline}:"
    if found:
        sentences.append(f"{lead} " + "; ".join(found) + ".")
    if within_noise:
        sentences.append(f"{'Also' if found else lead} significant over items but within run-to-run noise on "
                         + "; ".join(within_noise) + ".")
    if none:
        sizes = ", ".join(f"{_title(c)} {_points(stats[c]['smallest_detectable_difference'])}" for c in none)
        opening = "Otherwise no" if found or within_noise else f"{lead} no"
        sentences.append(f"{opening} difference detectable at this sample size on {', '.join(_title(c) for c in none)} "
                         f"(smallest detectable differences, in points: {sizes}).")
    if not row["paired"]:
        sentences.append("(Unpaired: per-item results are missing, so these use standard errors only.)")
    return " ".join(sentences)


def _cell(entry: dict, is_baseline: bool) -> str:
    if entry["seed_sd"] is not None:
        text = f"{entry['score']:.2f} ± {entry['seed_sd']:.2f} sd ({entry['seeds']} seeds)"
    else:
        text = f"{entry['score']:.2f} ± {'n/a' if entry['stderr'] is None else format(entry['stderr'], '.2f')}"
    if is_baseline:
        return text
    star = "*" if entry["significant"] else ""
    return f"{text} (Δ {entry['delta']:+.2f}{star} [{entry['ci95_low']:+.2f}, {entry['ci95_high']:+.2f}])"


def to_markdown(comparison: dict, routing: list[dict] | None = None) -> str:
    """Verdict sentences, the table with its legend, and (when given) the routing summary."""
    columns, rows = comparison["columns"], comparison["rows"]
    limit = comparison["limit"]
    lines = ["## Verdict", ""]
    lines += [_verdict(row, columns, comparison["baseline"]) for row in rows[1:]]
    notes = [row["label"] for row in rows[:1] if any(g and g.get("enabled") for g in row["gatepro"])]
    if notes:
        lines += ["", f"Note: the baseline **{notes[0]}** was evaluated with GatePro routing (its result file records "
                  "it, e.g. set by OLMOE_GATEPRO=1); it is not a stock baseline."]
    lines += [
        "", "## Scores", "",
        f"Suite: {comparison['suite']}; sample limit: {limit if limit is not None else 'none (full sets)'}. "
        "Scores in percent ± standard error (or ± seed standard deviation for groups of seeds). "
        f"Δ is to **{comparison['baseline']}** in points, with its 95% confidence interval in brackets; "
        "* marks an effect: p < 0.05 (exact McNemar per task, paired sign-flip permutation for the average and "
        "for clustered or seed-averaged items) and, with two or more seeds per group, a Δ beyond 1.96 times the "
        "seed spread. p-values are per column, not adjusted for the six columns. The verdict follows the p-value: "
        "with few items a bootstrap interval can exclude 0 where the exact or permutation test does not reject.",
        "",
        "| model | " + " | ".join(_title(c) for c in columns) + " |",
        "|" + " --- |" * (len(columns) + 1),
    ]
    for index, row in enumerate(rows):
        lines.append(f"| {row['label']} | " + " | ".join(_cell(row["columns"][c], index == 0) for c in columns) + " |")
    if routing:
        lines += ["", "## How much GatePro changed routing", "",
                  "Flip rate: the percentage of tokens whose top-k expert set GatePro changes, averaged over the "
                  "logged training steps; in an arm trained without GatePro it is what the paper's setting *would* "
                  "have changed (not applied).", "",
                  "| model | GatePro at evaluation | " + " | ".join(f"layer {i}" for i in range(len(routing[0]["layers"])))
                  + " | all layers |", "|" + " --- |" * (len(routing[0]["layers"]) + 3)]
        for entry in routing:
            cells = " | ".join(f"{100 * value:.3f}%" for value in entry["layers"])
            lines.append(f"| {entry['label']} | {entry['applied']} | {cells} | {100 * entry['overall']:.3f}% |")
    return "\n".join(lines) + "\n"


def to_csv(comparison: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    fields = ("score", "stderr", "seed_sd", "delta", "ci95_low", "ci95_high", "p_value", "n", "significant")
    writer.writerow(["model", "column", *fields])
    for row in comparison["rows"]:
        for column in comparison["columns"]:
            entry = row["columns"][column]
            writer.writerow([row["label"], column, *(_csv_value(entry.get(field)) for field in fields)])
    return buffer.getvalue()


def _csv_value(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def routing_summary(arms: list[Arm]) -> list[dict]:
    """Per arm whose runs have training metrics files: mean flip rate per layer and overall, over seeds."""
    summary = []
    for arm in arms:
        folders = [os.path.dirname(result["_source"]) for result in arm.results]
        runs = [records for folder in folders if (records := read_records(os.path.join(folder, METRICS_FILE)))]
        if not runs:
            continue
        records = [record for run in runs for record in run]
        layers = [statistics.fmean(record["layers"][i]["flip_rate"] for record in records)
                  for i in range(len(records[0]["layers"]))]
        gatepro = arm.results[0].get("gatepro")
        applied = f"on, lambda {gatepro['penalty']:g}" + (", hard" if gatepro.get("hard") else "") \
            if gatepro and gatepro.get("enabled") else "off"
        summary.append({"label": arm.label, "applied": applied, "layers": layers, "overall": statistics.fmean(layers),
                        "runs": runs})
    return summary


def compare(groups: dict[str, list[str]] | list[str], out_dir: str, echo=print, suite: str = "lm-eval") -> dict:
    """Compare results (a list: one per row, labels from the files) or groups of seeds (label -> runs).

    Writes table.md, table.csv, comparison.json, deltas.png and, for run folders with training
    metrics, the routing plots; returns the comparison.
    """
    if isinstance(groups, list):
        if len(groups) < 2:
            raise ValueError(f"compare needs two or more results; got {len(groups)}")
        named: dict[str, list[str]] = {}
        for path in groups:
            label = load_result(path, suite)["label"]
            unique, count = label, 1
            while unique in named:
                count += 1
                unique = f"{label} ({count})"
            if unique != label:
                echo(f"note: two results are labelled {label!r}; {path} is shown as {unique!r}")
            named[unique] = [path]
        groups = named
    if len(groups) < 2:
        raise ValueError(f"compare needs two or more groups; got {len(groups)}")
    arms = load_arms(groups, suite)
    comparison = compare_arms(arms, out_dir)
    routing = routing_summary(arms)
    os.makedirs(out_dir, exist_ok=True)
    from olmoe_gatepro.evaluation.plots import plot_deltas

    written = {
        "table.md": to_markdown(comparison, routing),
        "table.csv": to_csv(comparison),
        "comparison.json": json.dumps(_finite(comparison), indent=2, allow_nan=False),
    }
    for name, text in written.items():
        write_text_atomically(os.path.join(out_dir, name), text)
    plot_deltas(comparison, os.path.join(out_dir, "deltas.png"))
    written["deltas.png"] = ""
    echo(written["table.md"])
    if routing:
        from olmoe_gatepro.evaluation.plots import plot_coactivation_curves, plot_diversity_curves, plot_zero_token_curves

        runs = [{"setting": entry["label"], "label": entry["label"], "lb_loss_weight": 1.0, "records": records}
                for entry in routing for records in entry["runs"]]
        plot_zero_token_curves(runs, os.path.join(out_dir, "zero_token_count.png"))
        plot_diversity_curves(runs, os.path.join(out_dir, "diversity.png"))
        written.update({"zero_token_count.png": "", "diversity.png": ""})
        if all("partner_coactivation" in layer for run in runs for record in run["records"] for layer in record["layers"]):
            plot_coactivation_curves(runs, os.path.join(out_dir, "coactivation.png"))  # runs before 0.2 lack it
            written["coactivation.png"] = ""
    echo(f"wrote {', '.join(sorted(written))} to {out_dir}")
    return comparison


def _finite(value):
    """``value`` with every NaN replaced by None (null in JSON): an undefined statistic."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return None if isinstance(value, float) and math.isnan(value) else value
