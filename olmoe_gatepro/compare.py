"""Baseline vs GatePro side by side: the paper's Table 2 from evaluation result files.

A result file holds one model's scores on one task suite (``lm-eval``, ``lm-eval-offline`` or
``olmo-in-loop``); a run folder keeps them as ``eval_results.json`` (the lm-eval suites) and
``eval_results.olmo-in-loop.json``::

    {"schema": "olmoe-gatepro/eval-result/v1", "label": "baseline", "model": "...",
     "revision": null, "suite": "lm-eval", "limit": null, "gatepro": {...} or null,
     "tasks": {"mmlu": {"score": 0.376, "stderr": 0.004, "samples": 14042, "metric": "acc"}, ...}}

Scores are fractions in [0, 1]; the table shows percentages. A ``stderr`` of null (lm-eval
cannot estimate it from one sample) shows as n/a, and no delta is marked against it. The first result is the
baseline: every other row gets its delta to it and whether that delta exceeds its standard
error, sqrt(se_model^2 + se_baseline^2).
"""

import csv
import io
import json
import math
import os

from olmoe_gatepro.jsonl import read_records, write_text_atomically
from olmoe_gatepro.provenance import git_revision, package_versions

__all__ = ["SCHEMA", "RESULT_FILE", "IN_LOOP_RESULT_FILE", "RESULT_FILES", "result_record", "load_result", "comparison_rows", "to_markdown", "to_csv", "compare"]

SCHEMA = "olmoe-gatepro/eval-result/v1"
RESULT_FILE = "eval_results.json"  # the lm-eval suites'; other suites' files carry their name
IN_LOOP_RESULT_FILE = "eval_results.olmo-in-loop.json"
RESULT_FILES = {"lm-eval": RESULT_FILE, "olmo-in-loop": IN_LOOP_RESULT_FILE}
METRICS_FILE = "gatepro_metrics.jsonl"


def result_record(*, label: str, model: str, revision: str | None, suite: str, limit: int | None, gatepro,
                  tasks: dict) -> dict:
    """One evaluation in this schema; ``gatepro`` is the ``GateProConfig`` routed with, or None."""
    return {
        "schema": SCHEMA,
        "label": label,
        "model": model,
        "revision": revision,
        "suite": suite,
        "limit": limit,
        "gatepro": None if gatepro is None else {
            "enabled": gatepro.enabled, "penalty": gatepro.penalty,
            "num_competitors": gatepro.num_competitors, "hard": gatepro.hard,
        },
        "tasks": tasks,
        "versions": package_versions(),
        "git_revision": git_revision(),
    }


def load_result(path: str, suite: str = "lm-eval") -> dict:
    """A result file, or a run folder's result file of ``suite`` (``RESULT_FILES``); errors name the file."""
    file = os.path.join(path, RESULT_FILES[suite]) if os.path.isdir(path) else path
    try:
        with open(file) as handle:
            result = json.load(handle)
    except OSError as error:
        raise ValueError(f"cannot read result {file}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not valid JSON: {error}") from None
    if not isinstance(result, dict) or result.get("schema") != SCHEMA:
        raise ValueError(f"{file}: not an olmoe-gatepro result (schema {SCHEMA!r} expected)")
    for key in ("label", "suite", "tasks"):
        if key not in result:
            raise ValueError(f"{file}: missing key {key!r}")
    for task, entry in result["tasks"].items():
        if not isinstance(entry, dict) or not {"score", "stderr", "samples"} <= set(entry):
            raise ValueError(f"{file}: tasks.{task} needs score, stderr and samples")
    result["_source"] = file
    return result


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


def _percent(stderr) -> float:
    return math.nan if stderr is None else 100 * stderr


def _cell(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def comparison_rows(results: list[dict]) -> tuple[list[str], list[dict]]:
    """(tasks, rows): per model, percent scores per task and their average, deltas to row 0."""
    _check_comparable(results)
    tasks = sorted(results[0]["tasks"])
    rows = []
    for result in results:
        scores = {task: 100 * result["tasks"][task]["score"] for task in tasks}
        stderrs = {task: _percent(result["tasks"][task]["stderr"]) for task in tasks}
        scores["avg"] = sum(scores[task] for task in tasks) / len(tasks)
        stderrs["avg"] = math.sqrt(sum(stderrs[task] ** 2 for task in tasks)) / len(tasks)
        rows.append({"label": result["label"], "scores": scores, "stderrs": stderrs})
    baseline = rows[0]
    for row in rows:
        row["deltas"] = {key: row["scores"][key] - baseline["scores"][key] for key in baseline["scores"]}
        row["significant"] = {
            key: row is not baseline
            and abs(row["deltas"][key]) > math.hypot(row["stderrs"][key], baseline["stderrs"][key])
            for key in baseline["scores"]
        }
    return tasks, rows


def to_markdown(tasks: list[str], rows: list[dict], suite: str, limit) -> str:
    columns = tasks + ["avg"]
    lines = [
        f"Suite: {suite}; sample limit: {limit if limit is not None else 'none (full sets)'}. "
        "Scores in percent; Δ is to the first row; * marks a Δ larger than its standard error.",
        "",
        "| model | " + " | ".join(columns) + " |",
        "|" + " --- |" * (len(columns) + 1),
    ]
    for index, row in enumerate(rows):
        cells = []
        for column in columns:
            cell = f"{row['scores'][column]:.2f} ± {_cell(row['stderrs'][column])}"
            if index:
                mark = "*" if row["significant"][column] else ""
                cell += f" (Δ {row['deltas'][column]:+.2f}{mark})"
            cells.append(cell)
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(tasks: list[str], rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["model", "column", "score", "stderr", "delta", "delta_exceeds_stderr"])
    for row in rows:
        for column in tasks + ["avg"]:
            writer.writerow([
                row["label"], column, f"{row['scores'][column]:.4f}", f"{row['stderrs'][column]:.4f}",
                f"{row['deltas'][column]:.4f}", row["significant"][column],
            ])
    return buffer.getvalue()


def compare(paths: list[str], out_dir: str, echo=print, suite: str = "lm-eval") -> dict[str, str]:
    """Write table.md, table.csv and, for run folders with metrics files, the routing plots."""
    if len(paths) < 2:
        raise ValueError(f"compare needs two or more results; got {len(paths)}")
    results = [load_result(path, suite) for path in paths]
    tasks, rows = comparison_rows(results)
    os.makedirs(out_dir, exist_ok=True)
    written = {
        "table.md": to_markdown(tasks, rows, results[0]["suite"], results[0].get("limit")),
        "table.csv": to_csv(tasks, rows),
    }
    for name, text in written.items():
        write_text_atomically(os.path.join(out_dir, name), text)
    echo(written["table.md"])
    runs = [
        {"setting": result["label"], "label": result["label"], "lb_loss_weight": 1.0, "records": read_records(metrics)}
        for path, result in zip(paths, results)
        if os.path.isdir(path) and os.path.exists(metrics := os.path.join(path, METRICS_FILE))
    ]
    runs = [run for run in runs if run["records"]]
    if runs:
        from olmoe_gatepro.plots import plot_diversity_curves, plot_zero_token_curves

        plot_zero_token_curves(runs, os.path.join(out_dir, "zero_token_count.png"))
        plot_diversity_curves(runs, os.path.join(out_dir, "diversity.png"))
        written.update({"zero_token_count.png": "", "diversity.png": ""})
    echo(f"wrote {', '.join(sorted(written))} to {out_dir}")
    return written
