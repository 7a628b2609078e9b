"""``reproduce`` of a pipeline preset: OLMo-core trainings and the commands after them, as stages.

``olmoe-1b-7b-400b`` is the paper's OLMoE comparison on a GPU cluster, ``olmo-core-tiny`` the
same commands on one CPU. Train both configs with OLMo-core under a launcher (torchrun; the
trainer resumes from its latest checkpoint), convert both final checkpoints to Hugging Face
folders, evaluate both on the five benchmarks (lm-eval's stock tasks with hub data, unless told
to use the shipped copies), inspect, compare; both are also evaluated in the OLMo in-loop format
(``olmo_in_loop_suite``) and compared under ``report/olmo-in-loop``; ``report/learning_curves.png``
draws both trainings' in-loop scores, held-out and training loss against tokens from their
metrics files. A stage is skipped once its output exists; ``dry_run`` prints every command
instead, and the ``slurm`` and ``torchrun-nodes`` launchers render cluster scripts
(``pipelines.launch``).
"""

import importlib
import inspect
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

from olmoe_gatepro.evaluation.results import TASKS
from olmoe_gatepro.evaluation.results import IN_LOOP_RESULT_FILE, RESULT_FILE
from olmoe_gatepro.olmo_core.cost import Throughput, cost_lines
from olmoe_gatepro.olmo_core.run_config import SHIPPED_CONFIGS, RunConfig, load_run_config
from olmoe_gatepro.olmo_core.train import TRAINED_FILE
from olmoe_gatepro.pipelines.launch import LAUNCHERS, Cluster, check_trainings, launch
from olmoe_gatepro.pipelines.presets import PIPELINE_PRESETS
from olmoe_gatepro.pipelines.run_folder import ROUTING_FOLDER, run_folder_lock
from olmoe_gatepro.pipelines.presets import CORPUS_MODULES

__all__ = ["Stage", "pipeline_stages", "reproduce_pipeline", "print_costs", "launch_pipeline"]


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
