"""Did GatePro make a difference? Results side by side, with a method-level verdict.

Rows: each is one model, or a group of seeds of one arm (``--group gatepro=runs/g0,runs/g1``);
the first row is the baseline. Columns: the paper's tasks in its order, the paper's unweighted
average (kept for comparability with its Table 2), and the pre-declared primary endpoint: the
score over all items of all tasks pooled (``pooled``), whose detectable difference is far
smaller than the unweighted average's (COPA's 100 items weigh as much there as MMLU's 14,042).

Each row against the baseline, per column (``paired_stats``; docs/statistics.md):

- **Method level** (3+ seeds in both arms): the training run is the unit. A t test on the
  per-seed deltas when the arms are paired by seed (``paired_seeds``: the i-th runs of every
  group share initial weights and data order), Welch's t test otherwise; a 95% t interval.
- **Checkpoint level** (fewer seeds, or a seed spread of exactly 0): no claim about the method
  is made; the table shows the item-paired comparison of these checkpoints (seed-averaged for
  groups), labelled as such: exact McNemar per binary task, a paired sign-flip permutation test
  for clustered items and averages, a paired bootstrap interval. Results without per-item files
  fall back to an unpaired z test on their standard errors.
- The five task columns are Holm-adjusted per row (family-wise 5%); the primary endpoint is
  tested alone at 5%; the paper's average is descriptive. ``significant`` is the adjusted verdict.
- Power: the difference the test run could detect (80%, from its observed standard error: the
  arms' disagreement on items, or the seed spread), beside the paper's Table 2 delta; where
  seeds were measured (or a seed spread is given), the seeds per arm a method-level test needs.

Writes ``table.md`` (verdict first, then the table and, for run folders with training metrics,
how GatePro changed routing, with seed-level intervals), ``table.csv``, ``comparison.json``,
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
from scipy import stats

from olmoe_gatepro.core.config import METRICS_FILE
from olmoe_gatepro.evaluation import paired_stats
from olmoe_gatepro.evaluation.results import TASK_TITLES, TASKS, load_result, load_samples
from olmoe_gatepro.jsonl import read_records, write_text_atomically

__all__ = ["METRICS_FILE", "PRIMARY", "PAPER_AVERAGE", "PAPER_DELTAS", "ROUTING_METRICS", "Arm", "load_arms",
           "compare_arms", "routing_differences", "difference_text", "routing_verdict", "routing_difference_table", "routing_summary", "to_markdown", "to_csv", "parse_seed_sd", "compare"]

PRIMARY, PAPER_AVERAGE = "pooled", "avg"
# The paper's Table 2 (OLMoE-1B-7B, 400B tokens): GatePro minus baseline, in points.
PAPER_DELTAS = {"mmlu": 38.3 - 37.6, "hellaswag": 69.4 - 69.0, "arc_challenge": 40.57 - 39.46,
                "piqa": 77.69 - 76.87, "copa": 86.7 - 86.0, "avg": 62.5 - 61.8}
_MARKS = {"method": "*", "checkpoints": "†"}


@dataclass
class Arm:
    """A row of the comparison: one or more runs (seeds) of one model, with their per-item outcomes."""

    label: str
    paths: list[str]
    results: list[dict]
    samples: list[dict] | None  # per run: {task: {item: Outcome}}; None if any run lacks them


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


def _mean_outcome(arm: Arm, task: str, value) -> dict[str, float]:
    """{item: ``value(outcome)`` averaged over the arm's runs}; every run must hold the same items."""
    first = arm.samples[0][task]
    for run, result in zip(arm.samples[1:], arm.results[1:]):
        if set(run[task]) != set(first):
            raise ValueError(f"{result['_source']} and {arm.results[0]['_source']} scored different {task} items; "
                             "evaluate every run on the same data and limit")
    return {item: sum(value(run[task][item]) for run in arm.samples) / len(arm.samples) for item in first}


def _paired_task(baseline: Arm, other: Arm, task: str, value=lambda outcome: outcome.correct,
                 counts: bool = True) -> paired_stats.PairedTask:
    """Seed-averaged per-item differences of ``value`` (default: right or wrong), one entry per cluster."""
    base, model = _mean_outcome(baseline, task, value), _mean_outcome(other, task, value)
    if set(base) != set(model):
        raise ValueError(f"{baseline.results[0]['_source']} and {other.results[0]['_source']} scored different "
                         f"{task} items; evaluate both on the same data and limit")
    clusters: dict[str, list[float]] = {}
    for item, outcome in baseline.samples[0][task].items():
        clusters.setdefault(outcome.cluster, []).append(model[item] - base[item])
    ordered = [clusters[name] for name in sorted(clusters)]
    return paired_stats.PairedTask(np.array([sum(d) for d in ordered]), np.array([float(len(d)) for d in ordered]),
                                   counts)


def _scores(arm: Arm, tasks: list[str]) -> list[dict[str, float]]:
    """Per run, percent score per task, their unweighted average and the item-pooled score."""
    runs = []
    for result in arm.results:
        entries = result["tasks"]
        scores = {task: 100 * entries[task]["score"] for task in tasks}
        scores[PAPER_AVERAGE] = statistics.fmean(scores[task] for task in tasks)
        scores[PRIMARY] = sum(scores[t] * entries[t]["samples"] for t in tasks) / sum(entries[t]["samples"] for t in tasks)
        runs.append(scores)
    return runs


def _stderr(result: dict, tasks: list[str]) -> dict[str, float]:
    """Percent standard errors of one result (NaN where unknown), the averages' included."""
    entries = result["tasks"]
    stderrs = {task: math.nan if entries[task]["stderr"] is None else 100 * entries[task]["stderr"] for task in tasks}
    stderrs[PAPER_AVERAGE] = math.sqrt(sum(stderrs[task] ** 2 for task in tasks)) / len(tasks)
    samples = {task: entries[task]["samples"] for task in tasks}
    stderrs[PRIMARY] = math.sqrt(sum((samples[t] * stderrs[t]) ** 2 for t in tasks)) / sum(samples.values())
    return stderrs


def _chosen(column: str, tasks: list[str]) -> list[str]:
    return tasks if column in (PAPER_AVERAGE, PRIMARY) else [column]


def _checkpoint_tests(baseline: Arm, other: Arm, tasks: list[str], columns: list[str]) -> dict[str, dict]:
    """Per column, the comparison of these checkpoints (seed-averaged): item-paired, else unpaired z."""
    tests = {}
    if baseline.samples is not None and other.samples is not None:
        paired = {task: _paired_task(baseline, other, task) for task in tasks}
        for column in columns:
            chosen = [paired[task] for task in _chosen(column, tasks)]
            test = paired_stats.item_paired_test([paired_stats.PairedTask.pooled(chosen)] if column == PRIMARY else chosen)
            tests[column] = _in_points(test)
        return tests
    base_runs, other_runs = _scores(baseline, tasks), _scores(other, tasks)
    base_se, other_se = _stderr(baseline.results[0], tasks), _stderr(other.results[0], tasks)
    for column in columns:
        delta = statistics.fmean(r[column] for r in other_runs) - statistics.fmean(r[column] for r in base_runs)
        se = math.hypot(base_se[column], other_se[column])
        p_value = math.nan if math.isnan(se) or se == 0 else float(2 * stats.norm.sf(abs(delta) / se))
        tests[column] = {"delta": delta, "ci95_low": delta - paired_stats.Z_CRITICAL * se,
                         "ci95_high": delta + paired_stats.Z_CRITICAL * se, "p_value": p_value, "se": se, "df": None,
                         "n": sum(baseline.results[0]["tasks"][t]["samples"] for t in _chosen(column, tasks)),
                         "test": "unpaired z (no per-item results)"}
    return tests


def _in_points(test: dict) -> dict:
    return {key: 100 * value if key in ("delta", "ci95_low", "ci95_high", "se") else value for key, value in test.items()}


def _column_alpha(column: str, tasks: list[str]) -> float:
    """The level a single true effect in ``column`` must clear: Holm's first step for a task."""
    return paired_stats.ALPHA / len(tasks) if column in tasks else paired_stats.ALPHA


def _adjust(stats_by_column: dict[str, dict], level: str, tasks: list[str]) -> None:
    """Set ``p_adjusted`` and ``significant`` of every column's ``level`` test: Holm over the tasks."""
    if any(stats_by_column[column][level] is None for column in tasks):
        return
    adjusted = paired_stats.holm([stats_by_column[column][level]["p_value"] for column in tasks])
    for column, entry in stats_by_column.items():
        test = entry[level]
        if test is None:
            continue
        test["p_adjusted"] = adjusted[tasks.index(column)] if column in tasks else \
            None if column == PAPER_AVERAGE else test["p_value"]
        test["significant"] = test["p_adjusted"] is not None and test["p_adjusted"] < paired_stats.ALPHA


def _paper_delta(column: str, tasks: list[str], items: dict[str, int]) -> float | None:
    """The paper's Table 2 delta in points; the pooled column's implied by it at these item counts."""
    if column == PRIMARY:
        return sum(PAPER_DELTAS[t] * items[t] for t in tasks) / sum(items[t] for t in tasks)
    return PAPER_DELTAS.get(column)


def _seeds_needed(entry: dict, method: dict | None, base: list[float], other: list[float], paired: bool,
                  given_sd: float | None, alpha: float) -> tuple[int | None, str | None]:
    """Seeds per arm to detect the paper's delta at the method level, and where the seed spread came from."""
    effect = entry["paper_delta"]
    if effect is None:
        return None, None
    if method is not None and not method["zero_spread"]:
        if paired:
            sd = float(np.std(np.subtract(other, base), ddof=1))
            return paired_stats.seeds_needed(effect, sd, True, alpha), "measured seed spread, paired by seed"
        return (paired_stats.seeds_needed(effect, statistics.stdev(base), False, alpha, model_sd=statistics.stdev(other)),
                "measured seed spread")
    if given_sd is not None:
        return paired_stats.seeds_needed(effect, given_sd, False, alpha), "given seed spread (--seed-sd)"
    return None, None


def _column_stats(baseline: Arm, other: Arm, tasks: list[str], columns: list[str], paired_seeds: bool,
                  seed_sd: dict[str, float]) -> dict[str, dict]:
    base_runs, other_runs = _scores(baseline, tasks), _scores(other, tasks)
    checkpoints = _checkpoint_tests(baseline, other, tasks, columns)
    items = {task: baseline.results[0]["tasks"][task]["samples"] for task in tasks}
    by_column = {}
    for column in columns:
        base, model = [r[column] for r in base_runs], [r[column] for r in other_runs]
        method = paired_stats.seed_level_test(base, model, paired_seeds) if min(len(base), len(model)) >= 2 else None
        by_column[column] = {"method": method, "checkpoints": checkpoints[column]}
    for level in ("method", "checkpoints"):
        _adjust(by_column, level, tasks)
    out = {}
    for column in columns:
        method, checkpoint = by_column[column]["method"], by_column[column]["checkpoints"]
        seeds = [len(base_runs), len(other_runs)]
        at_method = min(seeds) >= paired_stats.MIN_SEEDS and not method["zero_spread"]
        shown = method if at_method else checkpoint
        alpha = _column_alpha(column, tasks)
        df = shown["df"] if at_method else None
        entry = {
            "role": "task" if column in tasks else "primary" if column == PRIMARY else "descriptive",
            "level": "method" if at_method else "checkpoints",
            **{key: shown[key] for key in ("delta", "ci95_low", "ci95_high", "p_value", "p_adjusted", "significant",
                                           "test")},
            "n": checkpoint["n"],  # independent items (clusters), or instances without per-item results
            "seeds_per_arm": seeds,
            "zero_seed_spread": bool(method and method["zero_spread"]),
            "detectable_difference": paired_stats.detectable_difference(shown["se"], df, alpha),
            "detectable_at_alpha": alpha,
            "paper_delta": _paper_delta(column, tasks, items),
            "method_test": method,
            "checkpoint_test": checkpoint,
        }
        entry["seeds_needed"], entry["seed_spread_source"] = _seeds_needed(
            entry, method, [r[column] for r in base_runs], [r[column] for r in other_runs], paired_seeds,
            seed_sd.get(column), alpha)
        out[column] = entry
    return out


def _has_margins(arm: Arm) -> bool:
    return arm.samples is not None and all(outcome.margin is not None for run in arm.samples
                                           for items in run.values() for outcome in items.values())


def _margin_stats(baseline: Arm, other: Arm, tasks: list[str], paired_seeds: bool,
                  accuracy: dict[str, dict]) -> dict[str, dict] | None:
    """Per task, the paired test of the right choice's margin (continuous), beside accuracy's.

    Levels as for accuracy: seeds as the unit with 3+ per arm (the per-run mean margin), else
    these checkpoints' items; Holm over the tasks (a family of its own). ``snr`` is |delta| /
    se of the test shown, ``snr_ratio`` the margin's over accuracy's at the same level: how
    many times better the margin separates the two rows (its square: the factor of items saved).
    None without margins in every run of both rows.
    """
    if not (_has_margins(baseline) and _has_margins(other)):
        return None

    def per_run(arm: Arm, task: str) -> list[float]:
        return [statistics.fmean(outcome.margin for outcome in run[task].values()) for run in arm.samples]

    by_task = {}
    for task in tasks:
        base, model = per_run(baseline, task), per_run(other, task)
        method = paired_stats.seed_level_test(base, model, paired_seeds) if min(len(base), len(model)) >= 2 else None
        items = _paired_task(baseline, other, task, value=lambda outcome: outcome.margin, counts=False)
        by_task[task] = {"method": method, "checkpoints": paired_stats.item_paired_test([items])}
    for level in ("method", "checkpoints"):
        _adjust(by_task, level, tasks)
    out = {}
    for task in tasks:
        level = accuracy[task]["level"]
        shown = by_task[task][level]
        accuracy_test = accuracy[task]["method_test" if level == "method" else "checkpoint_test"]
        snr = abs(shown["delta"]) / shown["se"] if shown["se"] > 0 else math.nan
        accuracy_snr = abs(accuracy_test["delta"]) / accuracy_test["se"] if accuracy_test["se"] > 0 else math.nan
        out[task] = {"level": level, **{key: shown[key] for key in ("delta", "ci95_low", "ci95_high", "p_value",
                                                                      "p_adjusted", "significant", "test", "se")},
                     "snr": snr, "accuracy_snr": accuracy_snr,
                     "snr_ratio": snr / accuracy_snr if accuracy_snr > 0 else math.nan}
    return out


def compare_arms(arms: list[Arm], out_dir: str = ".", paired_seeds: bool = False,
                 seed_sd: dict[str, float] | None = None) -> dict:
    """The comparison as a JSON-ready dict: method, and per row and column scores and statistics.

    ``paired_seeds``: the i-th run of every group shares initial weights and data order with
    the i-th run of the baseline (the groups must then have equal sizes). ``seed_sd``: column ->
    one model's seed standard deviation in points (e.g. a published one) for the seeds-needed
    estimate where seeds were not measured. Runs are named by their result files' paths
    relative to ``out_dir``, so a report folder moved with its runs says the same.
    """
    tasks = [task for task in TASKS if task in arms[0].results[0]["tasks"]]
    columns = tasks + [PAPER_AVERAGE, PRIMARY]
    seed_sd = seed_sd or {}
    unknown = sorted(set(seed_sd) - set(columns))
    if unknown:
        raise ValueError(f"--seed-sd: unknown column(s) {unknown}; known: {columns}")
    if paired_seeds and len({len(arm.results) for arm in arms}) > 1:
        raise ValueError("paired by seed needs the same number of runs in every group; got "
                         + ", ".join(f"{arm.label}: {len(arm.results)}" for arm in arms))
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
        column_stats = _column_stats(arms[0], arm, tasks, columns, paired_seeds, seed_sd) if index else {}
        for column in columns:
            values = [run[column] for run in runs]
            entry = {
                "score": statistics.fmean(values),
                "stderr": None if len(values) > 1 or math.isnan(stderrs[column]) else stderrs[column],
                "seed_sd": statistics.stdev(values) if len(values) > 1 else None,
                "seeds": len(values),
            }
            entry.update(column_stats.get(column, {}))
            row["columns"][column] = entry
        if index:
            row["margins"] = _margin_stats(arms[0], arm, tasks, paired_seeds, column_stats)
        rows.append(row)
    return {
        "baseline": arms[0].label,
        "suite": arms[0].results[0]["suite"],
        "limit": arms[0].results[0].get("limit"),
        "columns": columns,
        "tasks": tasks,
        "primary": PRIMARY,
        "paired_seeds": paired_seeds,
        "units": "percentage points",
        "method": {
            "unit": f"method level: the training run (seed), with {paired_stats.MIN_SEEDS}+ seeds per arm and a "
                    "seed spread above 0; otherwise checkpoint level: the items (no claim about the method)",
            "method_test": "paired t on per-seed deltas (paired_seeds) or Welch t on per-seed scores; 95% t interval",
            "checkpoint_test": "exact McNemar (one binary task; scipy.stats.binomtest), else paired sign-flip "
                               f"permutation, {paired_stats.RESAMPLES} resamples; 95% percentile interval of a paired "
                               f"bootstrap over items (stratified by task), seed {paired_stats.SEED}; seed-averaged "
                               "items for groups; unpaired z on standard errors without per-item results",
            "multiplicity": f"Holm over the {len(tasks)} task columns per row; the primary endpoint ({PRIMARY}: all "
                            "items pooled) at 5% alone; the paper's unweighted average descriptive (not tested)",
            "items": "MMLU's prompt variants of one question (in-loop suite) are one item",
            "detectable_difference": f"true difference found with {paired_stats.POWER:.0%} power by the test shown, "
                                     "from its observed standard error, at the level a single effect must clear "
                                     "(a task: 5% / tasks, Holm's first step)",
            "paper_delta": "the paper's Table 2 (OLMoE-1B-7B, 400B tokens), GatePro minus baseline; the pooled "
                           "column's is implied at this comparison's item counts",
            "seeds_needed": "seeds per arm for the method-level test to find the paper's delta with 80% power",
            "margins": "per task, the right choice's score minus the best wrong one's (log-likelihood, per character "
                       "for acc_norm/len_norm), tested like accuracy at the same level, Holm over the tasks; snr: "
                       "|delta| / standard error, snr_ratio: the margin's over accuracy's",
        },
        "rows": rows,
    }


def _title(column: str) -> str:
    return TASK_TITLES[column]


def _points(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if value >= 100:
        return "over 100"  # too few items to detect even the largest possible difference
    return f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def _p(entry: dict) -> str:
    if entry["role"] == "task":
        return f"Holm-adjusted p = {entry['p_adjusted']:.3g}"
    return f"p = {entry['p_value']:.3g}" if not math.isnan(entry["p_value"]) else "p undefined"


def _effect(entry: dict, column: str) -> str:
    direction = "better" if entry["delta"] > 0 else "worse"
    return (f"{direction} on {_title(column)} by {abs(entry['delta']):.2f} points "
            f"(95% CI {entry['ci95_low']:+.2f} to {entry['ci95_high']:+.2f}, {_p(entry)})")


def _design(row: dict, paired_seeds: bool) -> str:
    seeds = row["columns"][PRIMARY]["seeds_per_arm"]
    if seeds == [1, 1]:
        return "one run each"
    pairing = "paired by seed" if paired_seeds else "unpaired"
    return f"{seeds[0]} and {seeds[1]} seeds, {pairing}"


def _level_sentences(row: dict, columns: list[str], tasks: list[str], level: str, lead: str) -> list[str]:
    stats_ = row["columns"]
    shown = [c for c in columns if stats_[c]["level"] == level and stats_[c]["role"] != "descriptive"]
    if not shown:
        return []
    sentences = [lead] if lead else []
    if PRIMARY in shown:
        entry = stats_[PRIMARY]
        interval = f"95% CI {entry['ci95_low']:+.2f} to {entry['ci95_high']:+.2f}, {_p(entry)}"
        opening = f"Primary endpoint (all {entry['n']} items pooled):"
        if entry["significant"]:
            direction = "better" if entry["delta"] > 0 else "worse"
            found = "a method-level effect" if level == "method" else "these checkpoints differ"
            sentences.append(f"{opening} {direction} by {abs(entry['delta']):.2f} points ({interval}): {found}.")
        else:
            sentences.append(f"{opening} no difference detected (Δ {entry['delta']:+.2f} points, {interval}; "
                             f"detectable here: ≥ {_points(entry['detectable_difference'])}).")
    found = [_effect(stats_[c], c) for c in shown if c in tasks and stats_[c]["significant"]]
    none = [c for c in shown if c in tasks and not stats_[c]["significant"]]
    if found:
        sentences.append("Per task: " + "; ".join(found) + ".")
    if none:
        sizes = ", ".join(f"{_title(c)} {_points(stats_[c]['detectable_difference'])}" for c in none)
        sentences.append(f"{'Otherwise no' if found else 'Per task: no'} difference detected on "
                         f"{', '.join(_title(c) for c in none)} (detectable here, in points: {sizes}).")
    return sentences


def _signed(value: float) -> str:
    return f"{value:+.2f}".rstrip("0").rstrip(".")


def _outside(entry: dict, value: float) -> int:
    """-1 when the 95% interval lies below ``value``, 1 above, 0 when it holds it.

    At checkpoint level the interval is widened to the normal one from the floored standard
    error, so a zero-width bootstrap interval (two checkpoints agreeing on every item) rules
    nothing out.
    """
    low, high = entry["ci95_low"], entry["ci95_high"]
    if entry["level"] == "checkpoints":
        spread = paired_stats.Z_CRITICAL * entry["checkpoint_test"]["se"]
        low, high = min(low, entry["delta"] - spread), max(high, entry["delta"] + spread)
    return -1 if high < value else 1 if low > value else 0


def _paper_sentence(row: dict, columns: list[str]) -> str:
    untestable, testable, smaller, larger = [], [], [], []
    levels = set()
    for column in columns:
        entry = row["columns"][column]
        paper = entry["paper_delta"]
        if paper is None:
            continue
        name = f"{'(implied) ' if column == PRIMARY else ''}{_signed(paper)} on {_title(column)}"
        detectable = f"{name} (detectable here: ≥ {_points(entry['detectable_difference'])})"
        (testable if entry["detectable_difference"] <= abs(paper) else untestable).append(detectable)
        side = _outside(entry, paper)
        (smaller if side < 0 else larger if side > 0 else []).append(name)
        if side < 0:
            levels.add(entry["level"])
    parts = []
    if untestable:
        parts.append("cannot test the paper's " + "; ".join(untestable))
    if testable:
        parts.append("could detect the paper's " + "; ".join(testable))
    sentence = "Against the paper's Table 2 (OLMoE-1B-7B, 400B tokens): " + "; ".join(parts) + "."
    if smaller:
        meaning = "an effect of the method as large as the paper's is ruled out there (at this scale, on these items)" \
            if levels == {"method"} else "these checkpoints differ by less than the paper's delta there (no claim " \
            "about the method where the interval is a checkpoint one)"
        sentence += " The 95% interval lies below the paper's " + ", ".join(smaller) + f": {meaning}."
    if larger:
        sentence += " The 95% interval lies above the paper's " + ", ".join(larger) + "."
    return sentence


def _seeds_sentence(row: dict, columns: list[str]) -> str:
    needed = [(c, row["columns"][c]) for c in columns if row["columns"][c]["paper_delta"] is not None]
    known = [(c, e) for c, e in needed if e["seed_spread_source"]]
    if not known:
        return ("Seeds a method-level claim would need: unknown, no seed spread was measured (train 2+ seeds per arm, "
                "or give a published seed standard deviation with --seed-sd COLUMN=POINTS).")
    counts = ", ".join(f"{_title(c)} {e['seeds_needed'] if e['seeds_needed'] else f'over {paired_stats.MAX_SEEDS}'}"
                       for c, e in known)
    sources = sorted({e["seed_spread_source"] for _, e in known})
    return (f"Seeds per arm a method-level test would need to find the paper's deltas with 80% power "
            f"(from the {' and '.join(sources)}): {counts}.")


def _verdict(row: dict, comparison: dict) -> str:
    columns, tasks, baseline = comparison["columns"], comparison["tasks"], comparison["baseline"]
    stats_ = row["columns"]
    seeds = stats_[PRIMARY]["seeds_per_arm"]
    head = f"**{row['label']}** vs {baseline}: {_design(row, comparison['paired_seeds'])}"
    sentences = []
    if min(seeds) >= paired_stats.MIN_SEEDS:
        sentences += _level_sentences(row, columns, tasks, "method",
                                      f"{head}; method-level test, task columns Holm-adjusted over {len(tasks)}.")
        flagged = [c for c in columns if stats_[c]["level"] == "checkpoints"]
        if flagged:
            sentences.append(f"No claim about the method on {', '.join(_title(c) for c in flagged)}: the seed spread "
                             "there is exactly 0 (flagged, not read as certainty; with few items scores move in coarse "
                             "steps that can hide seed noise).")
            sentences += _level_sentences(row, flagged, tasks, "checkpoints", "There, comparing these checkpoints "
                                          "item by item instead:")
    else:
        few = "" if seeds == [1, 1] else f", {min(seeds)} seeds in an arm"
        sentences.append(f"{head}; no claim about the method can be made{few} (a method-level test needs at least "
                         f"{paired_stats.MIN_SEEDS} seeds per arm).")
        zero = [c for c in columns if stats_[c]["zero_seed_spread"]]
        if zero:
            sentences.append(f"Seed spread exactly 0 on {', '.join(_title(c) for c in zero)} (flagged, not read as "
                             "certainty).")
        sentences += _level_sentences(row, columns, tasks, "checkpoints",
                                      "Comparing these checkpoints on these items instead "
                                      f"({'seed-averaged, ' if max(seeds) > 1 else ''}"
                                      f"{'item-paired' if row['paired'] else 'unpaired: per-item results are missing'}; "
                                      f"task columns Holm-adjusted over {len(tasks)}):")
    if row.get("margins"):
        sentences.append(_margin_sentence(row["margins"], tasks))
    sentences.append(_paper_sentence(row, columns))
    sentences.append(_seeds_sentence(row, columns))
    return " ".join(sentences)


def _ratio(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2g}x"


def _margin_sentence(margins: dict[str, dict], tasks: list[str]) -> str:
    found = [f"{'higher' if margins[t]['delta'] > 0 else 'lower'} on {_title(t)} by {abs(margins[t]['delta']):.3g} "
             f"(95% CI {margins[t]['ci95_low']:+.3g} to {margins[t]['ci95_high']:+.3g}, Holm-adjusted p = "
             f"{margins[t]['p_adjusted']:.3g}{'' if margins[t]['level'] == 'method' else ', these checkpoints'})"
             for t in tasks if margins[t]["significant"]]
    none = [_title(t) for t in tasks if not margins[t]["significant"]]
    parts = []
    if found:
        parts.append("; ".join(found))
    if none:
        parts.append(f"no difference detected on {', '.join(none)}")
    ratios = ", ".join(f"{_title(t)} {_ratio(margins[t]['snr_ratio'])}" for t in tasks)
    return (f"Margin of the right choice over the best wrong one (continuous, tested at the same level as accuracy, "
            f"Holm over the tasks): {'; '.join(parts)}. Its signal-to-noise (|Δ| / standard error) over accuracy's: "
            f"{ratios}.")


def _cell(entry: dict, is_baseline: bool) -> str:
    if entry["seed_sd"] is not None:
        text = f"{entry['score']:.2f} ± {entry['seed_sd']:.2f} sd ({entry['seeds']} seeds)"
    else:
        text = f"{entry['score']:.2f} ± {'n/a' if entry['stderr'] is None else format(entry['stderr'], '.2f')}"
    if is_baseline:
        return text
    mark = _MARKS[entry["level"]] if entry["significant"] else ""
    flag = " (seed spread 0)" if entry["zero_seed_spread"] else ""
    return f"{text} (Δ {entry['delta']:+.2f}{mark} [{entry['ci95_low']:+.2f}, {entry['ci95_high']:+.2f}]{flag})"


def _margin_cell(entry: dict) -> str:
    mark = _MARKS[entry["level"]] if entry["significant"] else ""
    return (f"Δ {entry['delta']:+.3g}{mark} [{entry['ci95_low']:+.3g}, {entry['ci95_high']:+.3g}] "
            f"(SNR ratio {_ratio(entry['snr_ratio'])})")


def _legend(comparison: dict) -> str:
    limit = comparison["limit"]
    tasks = comparison["tasks"]
    return (
        f"Suite: {comparison['suite']}; sample limit: {limit if limit is not None else 'none (full sets)'}. "
        "Scores in percent ± standard error (± seed standard deviation for groups of seeds). "
        f"Δ is to **{comparison['baseline']}** in points, with its 95% confidence interval in brackets. "
        f"With {paired_stats.MIN_SEEDS}+ seeds per arm the interval and test are at the method level (runs as the "
        "unit: a t test on per-seed deltas when paired by seed, else Welch's t test); otherwise they compare these "
        "checkpoints item by item (exact McNemar per task, paired sign-flip permutation for clustered items and "
        "averages, paired bootstrap interval) and make no claim about the method. "
        f"* marks a method-level effect, † a checkpoint-level difference; the {len(tasks)} task columns are "
        "Holm-adjusted per row (family-wise 5%), the primary endpoint (all items pooled, pre-declared) is tested "
        "alone at 5%, and the paper's unweighted average is shown for comparability only (not tested). "
        "Intervals are per column, not adjusted: one can exclude 0 where the adjusted test does not reject. "
        "docs/statistics.md explains every number."
    )


def to_markdown(comparison: dict, routing: list[dict] | None = None) -> str:
    """Verdict sentences, the table with its legend, and (when given) the routing summary."""
    columns, rows = comparison["columns"], comparison["rows"]
    lines = ["## Verdict", ""]
    for row in rows[1:]:
        lines += [_verdict(row, comparison), ""]
    notes = [row["label"] for row in rows[:1] if any(g and g.get("enabled") for g in row["gatepro"])]
    if notes:
        lines += [f"Note: the baseline **{notes[0]}** was evaluated with GatePro routing (its result file records "
                  "it, e.g. set by OLMOE_GATEPRO=1); it is not a stock baseline.", ""]
    lines += [
        "## Scores", "", _legend(comparison), "",
        "| model | " + " | ".join(_title(c) for c in columns) + " |",
        "|" + " --- |" * (len(columns) + 1),
    ]
    for index, row in enumerate(rows):
        lines.append(f"| {row['label']} | " + " | ".join(_cell(row["columns"][c], index == 0) for c in columns) + " |")
    if any(row.get("margins") for row in rows[1:]):
        tasks = comparison["tasks"]
        lines += ["", "## Margin of the right choice", "",
                  "Per task, the mean over items of the right choice's score minus the best wrong choice's (log-likelihood;"
                  " per character where the task's metric normalises by length), to the baseline, with its 95% interval "
                  "at the level accuracy is tested (* method, † checkpoints; Holm over the tasks). SNR ratio: its "
                  "|Δ| / standard error over accuracy's.", "",
                  "| model | " + " | ".join(_title(t) for t in tasks) + " |", "|" + " --- |" * (len(tasks) + 1)]
        for row in rows[1:]:
            if row.get("margins"):
                lines.append(f"| {row['label']} | " + " | ".join(_margin_cell(row["margins"][t]) for t in tasks) + " |")
    if routing:
        lines += ["", *_routing_markdown(routing, comparison["paired_seeds"])]
    return "\n".join(lines) + "\n"


_CSV_FIELDS = ("score", "stderr", "seed_sd", "seeds", "delta", "ci95_low", "ci95_high", "p_value", "p_adjusted",
               "significant", "level", "test", "n", "detectable_difference", "paper_delta", "seeds_needed")


def to_csv(comparison: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["model", "column", *_CSV_FIELDS])
    for row in comparison["rows"]:
        for column in comparison["columns"]:
            entry = row["columns"][column]
            writer.writerow([row["label"], column, *(_csv_value(entry.get(field)) for field in _CSV_FIELDS)])
    return buffer.getvalue()


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "/".join(str(v) for v in value)
    return f"{value:.6g}" if isinstance(value, float) else str(value)


# The paper's Figure 4-5 routing metrics: (key in a layer's record, name, scale to the unit shown, unit).
ROUTING_METRICS = (("partner_coactivation", "partner co-activation", 100, "points"),
                   ("avg_cosine_similarity", "gate cosine similarity", 1, ""),
                   ("spectral_entropy", "spectral entropy", 1, ""),
                   ("zero_token_count", "zero-token experts", 1, "experts"))
END_OF_TRAINING = 0.75  # a run's routing: the mean over its logged steps after 75% of its last step


def routing_differences(baseline: list[list[dict]], model: list[list[dict]], paired: bool) -> dict[str, dict]:
    """Each ``ROUTING_METRICS`` metric of ``model``'s runs minus ``baseline``'s, seed by seed.

    ``baseline``, ``model``: per run (seed), its layers' metric records (the same layer count).
    Per metric: ``layers``, a ``seed_level_test`` per layer, and ``overall``, one of the mean
    over layers, in the unit shown (co-activation in points). The overall tests are the claims:
    Holm over the metrics, ``significant`` only at the method level (3+ seeds per arm, a spread
    above 0); per-layer intervals are descriptive.
    """
    if {len(run) for run in baseline + model} != {len(baseline[0])}:
        raise ValueError("routing differences need the same MoE layers in every run")
    out = {}
    for key, name, scale, unit in ROUTING_METRICS:
        def values(runs):
            return np.array([[scale * layer[key] for layer in run] for run in runs])

        base, other = values(baseline), values(model)
        out[key] = {"name": name, "unit": unit,
                    "layers": [paired_stats.seed_level_test(base[:, i], other[:, i], paired) for i in range(base.shape[1])],
                    "overall": paired_stats.seed_level_test(base.mean(axis=1), other.mean(axis=1), paired)}
    paired_stats.adjust_seed_level_tests([out[key]["overall"] for key, *_ in ROUTING_METRICS])
    return out


def difference_text(test: dict, unit: str = "", interval: str = "95% CI ") -> str:
    """A seed-level difference as written in reports: ``+1.2 pts (95% CI +0.3 to +2.1)``, or why it has no
    interval; ``interval`` precedes the bounds."""
    value = f"{test['delta']:+.3g}{' ' + unit if unit else ''}"
    if math.isnan(test["ci95_low"]):
        return f"{value} (no interval: {'seed spread 0' if test['zero_spread'] else 'one seed'})"
    return f"{value} ({interval}{test['ci95_low']:+.3g} to {test['ci95_high']:+.3g})"


def routing_verdict(label: str, baseline: str, differences: dict[str, dict], paired: bool, what: str) -> str:
    """One sentence per arm: each metric's overall difference to the baseline, its interval and the claim."""
    seeds = differences[ROUTING_METRICS[0][0]]["overall"]["seeds"]
    design = f"{seeds[0]} and {seeds[1]} seeds, {'paired by seed' if paired else 'unpaired'}"
    parts = []
    for key, *_ in ROUTING_METRICS:
        entry, test = differences[key], differences[key]["overall"]
        verdict = ("an effect" if test["significant"] else "no effect detected") \
            if min(seeds) >= paired_stats.MIN_SEEDS and not test["zero_spread"] else "no claim"
        parts.append(f"{entry['name']} {difference_text(test, entry['unit'])}, {verdict}")
    lead = f"**{label}** vs {baseline}, {what} ({design}; mean over layers, seed-level t intervals, Holm over the " \
           f"{len(ROUTING_METRICS)} metrics)"
    if min(seeds) < paired_stats.MIN_SEEDS:
        lead += f": no claim about the method with fewer than {paired_stats.MIN_SEEDS} seeds per arm"
    return f"{lead}: " + "; ".join(parts) + "."


def routing_difference_table(label: str, differences: dict[str, dict]) -> list[str]:
    """Markdown rows: per metric, each layer's and the overall difference with its interval."""
    lines = []
    for key, *_ in ROUTING_METRICS:
        entry = differences[key]
        name = f"{entry['name']} ({entry['unit']})" if entry["unit"] else entry["name"]
        cells = [difference_text(test) for test in entry["layers"]] + [difference_text(entry["overall"])]
        lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    return lines


def _routing_markdown(routing: list[dict], paired: bool) -> list[str]:
    layers = len(routing[0]["layers"])
    lines = ["## How much GatePro changed routing", "",
             "Flip rate: the percentage of tokens whose top-k expert set GatePro changes, averaged over the "
             "logged training steps; in an arm trained without GatePro it is what the paper's setting *would* "
             "have changed (not applied).", "",
             "| model | GatePro at evaluation | " + " | ".join(f"layer {i}" for i in range(layers))
             + " | all layers |", "|" + " --- |" * (layers + 3)]
    for entry in routing:
        cells = " | ".join(f"{100 * value:.3f}%" for value in entry["layers"])
        lines.append(f"| {entry['label']} | {entry['applied']} | {cells} | {100 * entry['overall']:.3f}% |")
    compared = [entry for entry in routing[1:] if entry.get("vs_baseline")]
    if compared:
        lines += ["", "### Routing at the end of training, to the baseline", "",
                  f"Each run's routing metrics averaged over its logged steps after {END_OF_TRAINING:.0%} of training "
                  "(the paper's Figures 4 and 5: partner co-activation, in points; gate cosine similarity; spectral "
                  "entropy; experts with no token in a batch), each arm minus the baseline with a seed-level 95% t "
                  "interval (docs/statistics.md).", ""]
        lines += [routing_verdict(entry["label"], routing[0]["label"], entry["vs_baseline"], paired,
                                  "during training") for entry in compared]
        lines += ["", "| model | metric | " + " | ".join(f"layer {i}" for i in range(layers)) + " | all layers |",
                  "|" + " --- |" * (layers + 3)]
        for entry in compared:
            lines += routing_difference_table(entry["label"], entry["vs_baseline"])
    return lines


def end_of_training_routing(records: list[dict]) -> list[dict]:
    """A run's layers' metrics averaged over its logged steps after ``END_OF_TRAINING`` of its last step."""
    last = records[-1]["step"]
    late = [record for record in records if record["step"] >= END_OF_TRAINING * last]
    return [{key: statistics.fmean(record["layers"][i][key] for record in late) for key, *_ in ROUTING_METRICS
             if all(key in record["layers"][i] for record in late)} for i in range(len(late[0]["layers"]))]


def routing_summary(arms: list[Arm], paired_seeds: bool = False) -> list[dict]:
    """Per arm whose runs all have training metrics files: mean flip rate per layer and overall over
    seeds, and (arms after the first, where the baseline has them too) ``vs_baseline``:
    ``routing_differences`` of the end-of-training routing."""
    summary = []
    for arm in arms:
        folders = [os.path.dirname(result["_source"]) for result in arm.results]
        runs = [records for folder in folders if (records := read_records(os.path.join(folder, METRICS_FILE)))]
        if not runs or len(runs) < len(folders):
            continue
        records = [record for run in runs for record in run]
        layers = [statistics.fmean(record["layers"][i]["flip_rate"] for record in records)
                  for i in range(len(records[0]["layers"]))]
        gatepro = arm.results[0].get("gatepro")
        applied = f"on, lambda {gatepro['penalty']:g}" + (", hard" if gatepro.get("hard") else "") \
            if gatepro and gatepro.get("enabled") else "off"
        summary.append({"label": arm.label, "applied": applied, "layers": layers, "overall": statistics.fmean(layers),
                        "runs": runs, "end_of_training": [end_of_training_routing(run) for run in runs]})
    if summary and summary[0]["label"] == arms[0].label:
        measured = all(all(key in layer for key, *_ in ROUTING_METRICS for run in entry["end_of_training"] for layer in run)
                       for entry in summary)  # runs before 0.2 lack partner co-activation
        for entry in summary[1:]:
            if measured and (not paired_seeds or len(entry["runs"]) == len(summary[0]["runs"])):
                entry["vs_baseline"] = routing_differences(summary[0]["end_of_training"], entry["end_of_training"],
                                                           paired_seeds)
    return summary


def parse_seed_sd(texts: list[str]) -> dict[str, float]:
    """``--seed-sd COLUMN=POINTS`` flags as {column: points}; bad ones are a ValueError naming them."""
    parsed = {}
    for text in texts:
        column, sep, value = text.partition("=")
        try:
            points = float(value)
        except ValueError:
            points = math.nan
        if not sep or not math.isfinite(points) or points <= 0:
            raise ValueError(f"--seed-sd {text!r}: expected COLUMN=POINTS with POINTS a number > 0 (one model's "
                             "seed standard deviation in percentage points)")
        if column in parsed:
            raise ValueError(f"--seed-sd {text!r}: {column} is given twice")
        parsed[column] = points
    return parsed


def compare(groups: dict[str, list[str]] | list[str], out_dir: str, echo=print, suite: str = "lm-eval",
            paired_seeds: bool = False, seed_sd: dict[str, float] | None = None) -> dict:
    """Compare results (a list: one per row, labels from the files) or groups of seeds (label -> runs).

    ``paired_seeds`` and ``seed_sd``: as ``compare_arms``. Writes table.md, table.csv, comparison.json, deltas.png and, for run folders with training
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
    comparison = compare_arms(arms, out_dir, paired_seeds, seed_sd)
    routing = routing_summary(arms, paired_seeds)
    comparison["routing"] = [{"label": entry["label"], "vs_baseline": entry["vs_baseline"]} for entry in routing
                             if entry.get("vs_baseline")]
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
        from olmoe_gatepro.evaluation.curves import routing_curves
        from olmoe_gatepro.evaluation.plots import plot_coactivation_curves, plot_diversity_curves, plot_zero_token_curves

        records = [(entry["label"], run) for entry in routing for run in entry["runs"]]
        runs = [routing_curves(label, run) for label, run in records]
        plot_zero_token_curves(runs, os.path.join(out_dir, "zero_token_count.png"))
        plot_diversity_curves(runs, os.path.join(out_dir, "diversity.png"))
        written.update({"zero_token_count.png": "", "diversity.png": ""})
        if all("partner_coactivation" in layer for _, run in records for record in run for layer in record["layers"]):
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
