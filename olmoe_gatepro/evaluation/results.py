"""Evaluation result files: one model's scores on one suite, and the outcome of every item.

A run folder keeps, per suite (``RESULT_FILES`` key: ``lm-eval`` or ``olmo-in-loop``)::

    eval_results[.olmo-in-loop].json
        {"schema": "olmoe-gatepro/eval-result/v1", "label": "baseline", "model": "...",
         "revision": null, "suite": "lm-eval", "limit": null, "gatepro": {...} or null,
         "tasks": {"mmlu": {"score": 0.376, "stderr": 0.004, "samples": 14042, "metric": "acc"}, ...}}
    samples.<suite>.jsonl
        one line per evaluated item: {"task": "copa", "item": "17", "correct": true,
        "logprob": -12.3, "margin": 0.8}, plus "cluster" where several items are one independent
        unit (MMLU's prompt variants of one question in the in-loop suite). ``logprob``: the
        summed log-likelihood of the right choice; ``margin``: its score minus the best wrong
        choice's under the task's metric (positive exactly when right); both absent in files
        written before 0.3.

Scores are fractions in [0, 1]. Item ids are stable: the same for every model evaluated on the
same data and limit, so two checkpoints can be compared item by item.

``load_result`` also reads lm-eval's own output (``lm_eval --output_path OUT --log_samples``):
its ``results_<date>.json`` and, for the per-item outcomes, the ``samples_<task>_<date>.jsonl``
of the same run (``lm_eval_suite.stock_result``; docs/statistics.md has the mapping).
"""

import json
import math
import os
from typing import NamedTuple

from olmoe_gatepro.jsonl import read_json, read_text, write_text_atomically
from olmoe_gatepro.provenance import git_revision, package_versions

__all__ = [
    "SCHEMA",
    "TASKS",
    "TASK_TITLES",
    "Outcome",
    "RESULT_FILE",
    "IN_LOOP_RESULT_FILE",
    "RESULT_FILES",
    "SAMPLE_FILES",
    "result_record",
    "load_result",
    "samples_path",
    "load_samples",
    "write_evaluation",
]

SCHEMA = "olmoe-gatepro/eval-result/v1"
TASKS = ("mmlu", "hellaswag", "arc_challenge", "piqa", "copa")  # the paper's column order
TASK_TITLES = {"mmlu": "MMLU", "hellaswag": "HellaSwag", "arc_challenge": "ARC-Challenge", "piqa": "PIQA",
               "copa": "COPA", "avg": "average",
               "pooled": "all items (primary)"}  # compare's columns: the tasks, their average, all items pooled
RESULT_FILE = "eval_results.json"  # the lm-eval suites'; other suites' files carry their name
IN_LOOP_RESULT_FILE = "eval_results.olmo-in-loop.json"
RESULT_FILES = {"lm-eval": RESULT_FILE, "olmo-in-loop": IN_LOOP_RESULT_FILE}
SAMPLE_FILES = {"lm-eval": "samples.lm-eval.jsonl", "olmo-in-loop": "samples.olmo-in-loop.jsonl"}


class Outcome(NamedTuple):
    """One evaluated item: its independent unit (``cluster``), whether the model got it right,
    and (None in files written before 0.3) the margin of the correct choice over the best wrong one."""

    cluster: str
    correct: bool
    margin: float | None = None


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


def _suite_key(suite: str) -> str:
    return "olmo-in-loop" if suite == "olmo-in-loop" else "lm-eval"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_task_entry(file: str, task: str, entry) -> None:
    where = f"{file}: tasks.{task}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping with score, stderr and samples; got {entry!r}")
    missing = [key for key in ("score", "stderr", "samples") if key not in entry]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    if not _is_number(entry["score"]) or not 0 <= entry["score"] <= 1:
        raise ValueError(f"{where}.score: expected a fraction in [0, 1]; got {entry['score']!r}")
    if entry["stderr"] is not None and (not _is_number(entry["stderr"]) or entry["stderr"] < 0):
        raise ValueError(f"{where}.stderr: expected a number >= 0 or null; got {entry['stderr']!r}")
    samples = entry["samples"]
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"{where}.samples: expected an integer >= 1; got {samples!r}")


def _lm_eval_results_files(folder: str) -> list[str]:
    """lm-eval results files in ``folder`` and its subfolders one level down (lm-eval's OUT/<model>/)."""
    found = []
    for base in [folder] + sorted(os.path.join(folder, name) for name in os.listdir(folder)
                                  if os.path.isdir(os.path.join(folder, name))):
        found += sorted(os.path.join(base, name) for name in os.listdir(base)
                        if name.startswith("results_") and name.endswith(".json"))
    return found


def _result_file(path: str, suite: str) -> str:
    """The result file ``path`` names: itself, a run folder's own result file of ``suite``, or the one
    lm-eval results file under a folder (several: an error listing them)."""
    if not os.path.isdir(path):
        return path
    own = os.path.join(path, RESULT_FILES[suite])
    if os.path.exists(own) or suite != "lm-eval":
        return own
    candidates = _lm_eval_results_files(path)
    if len(candidates) > 1:
        raise ValueError(f"{path}: holds {len(candidates)} lm-eval results files ({', '.join(candidates)}); "
                         "give the one to compare")
    return candidates[0] if candidates else own


def load_result(path: str, suite: str = "lm-eval") -> dict:
    """A result: a file (ours, or lm-eval's own results file), or a folder holding one (``RESULT_FILES``
    of ``suite``, else one lm-eval results file, also one folder down). Errors name the file."""
    file = _result_file(path, suite)
    try:
        result = read_json(file)
    except OSError as error:
        raise ValueError(f"cannot read result {file}: {error.strerror}") from None
    from olmoe_gatepro.evaluation import lm_eval_suite  # it builds on this module

    if lm_eval_suite.is_lm_eval_results(result):
        result = lm_eval_suite.stock_result(file, result)
    if not isinstance(result, dict) or result.get("schema") != SCHEMA:
        raise ValueError(f"{file}: neither an olmoe-gatepro result (schema {SCHEMA!r}) nor an lm-eval results file")
    for key in ("label", "suite", "tasks"):
        if key not in result:
            raise ValueError(f"{file}: missing key {key!r}")
    if not isinstance(result["label"], str) or not result["label"].strip():
        raise ValueError(f"{file}: label must be a non-empty string; got {result['label']!r}")
    tasks = result["tasks"]
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError(f"{file}: tasks must be a non-empty mapping of task to score; got {tasks!r}")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"{file}: unknown task(s) {unknown}; known: {list(TASKS)}")
    for task, entry in tasks.items():
        _check_task_entry(file, task, entry)
    result["_source"] = os.path.abspath(file)
    return result


def samples_path(result: dict) -> str:
    """The per-item file beside a loaded result's file."""
    return os.path.join(os.path.dirname(result["_source"]), SAMPLE_FILES[_suite_key(result["suite"])])


def load_samples(result: dict) -> dict[str, dict[str, Outcome]] | None:
    """{task: {item: Outcome}} of a loaded result; None when it has no per-item file.

    A per-item file that does not match the result (other tasks, or scores that differ from the
    result's) is an error naming both files.
    """
    if "_lm_eval" in result:
        from olmoe_gatepro.evaluation.lm_eval_suite import stock_samples

        records = stock_samples(result)
        where = result["_source"]
        return None if records is None else _checked(_outcomes([(where, record) for record in records]), result, where)
    path = samples_path(result)
    if not os.path.exists(path):
        return None
    records = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        try:
            records.append((f"{path}, line {number}", json.loads(line)))
        except json.JSONDecodeError:
            raise ValueError(f"{path}, line {number}: expected {{\"task\", \"item\", \"correct\"}}") from None
    return _checked(_outcomes(records), result, path)


def _outcomes(records: list[tuple[str, dict]]) -> dict[str, dict[str, Outcome]]:
    """{task: {item: Outcome}} from (where, per-item record) pairs; errors name ``where``."""
    items: dict[str, dict[str, Outcome]] = {}
    for where, record in records:
        try:
            task, item, correct = record["task"], str(record["item"]), record["correct"]
            cluster = str(record.get("cluster", item))
        except (KeyError, TypeError):
            raise ValueError(f"{where}: expected {{\"task\", \"item\", \"correct\"}}") from None
        if not isinstance(correct, bool):
            raise ValueError(f"{where}: correct must be true or false; got {correct!r}")
        if item in items.setdefault(task, {}):
            raise ValueError(f"{where}: item {item!r} of {task} appears twice")
        margin = record.get("margin")
        if margin is not None and not _is_number(margin):
            raise ValueError(f"{where}: margin must be a finite number or absent; got {margin!r}")
        items[task][item] = Outcome(cluster, correct, None if margin is None else float(margin))
    return items


def _checked(items: dict[str, dict[str, Outcome]], result: dict, path: str) -> dict[str, dict[str, Outcome]]:
    """``items`` after checking that they are the items of ``result`` (same tasks, same scores)."""
    if set(items) != set(result["tasks"]):
        raise ValueError(f"{path} holds tasks {sorted(items)} but {result['_source']} has {sorted(result['tasks'])}")
    for task, outcomes in items.items():
        score = sum(outcome.correct for outcome in outcomes.values()) / len(outcomes)
        if abs(score - result["tasks"][task]["score"]) > 1e-6:
            raise ValueError(
                f"{path}: {task} items score {score:.6f} but {result['_source']} says "
                f"{result['tasks'][task]['score']:.6f}; the two files are not from one evaluation"
            )
    return items


def write_evaluation(out_dir: str, suite: str, result: dict, samples: list[dict]) -> str:
    """Write the per-item file, then the result file (its existence marks the evaluation done).

    Both atomically; returns the result file's path.
    """
    os.makedirs(out_dir, exist_ok=True)
    key = _suite_key(suite)
    lines = "".join(json.dumps(sample, sort_keys=True) + "\n" for sample in samples)
    write_text_atomically(os.path.join(out_dir, SAMPLE_FILES[key]), lines)
    path = os.path.join(out_dir, RESULT_FILES[key])
    write_text_atomically(path, json.dumps(result, indent=2))
    return path
