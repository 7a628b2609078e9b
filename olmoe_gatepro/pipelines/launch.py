"""Multi-node launches of a pipeline preset's trainings: SLURM jobs, or torchrun scripts for other clusters.

``slurm``: one batch script per training (``<out>/launch/train-<name>.sbatch``, from the template
``configs/launch/train.sbatch``): N nodes, one srun task per node running torchrun with a c10d
rendezvous on the first node of the allocation, the absolute save folder of the run folder,
one W&B run id per training, ``--requeue``, and a warning signal before the time limit on
which the training saves a checkpoint and stops (``olmo_core.stop``) and the job requeues
itself; a requeued or resubmitted job resumes from the latest checkpoint. A last job
(``finish.sbatch``) starts when both trainings have ended well and runs the rest of the
pipeline (convert, evaluate, inspect, compare). ``launch`` submits them with ``sbatch``.

``torchrun-nodes``: one script per training (``train-<name>-node.sh``) to start on every node
of a cluster without SLURM.

Every path in a rendered script is absolute, so a job starts from any folder.
"""

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from olmoe_gatepro.jsonl import append_record, write_text_atomically
from olmoe_gatepro.olmo_core.stop import STOP_FILE
from olmoe_gatepro.olmo_core.train import TRAINED_FILE

__all__ = ["LAUNCHERS", "LAUNCH_FOLDER", "Cluster", "LaunchScript", "render", "check_trainings", "launch_scripts", "launch"]

TEMPLATES = Path(__file__).resolve().parents[1] / "configs" / "launch"  # package data
LAUNCHERS = ("slurm", "torchrun-nodes")
LAUNCH_FOLDER = "launch"  # in the run folder: the rendered scripts, logs/ and jobs.jsonl
JOBS_FILE = "jobs.jsonl"
SLURM_TIME = re.compile(r"(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?")


def _slurm_seconds(text: str) -> int:
    """Seconds of a SLURM time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
    match = SLURM_TIME.fullmatch(text)
    if not match:
        raise ValueError(f"time {text!r} is not a SLURM time limit (e.g. 48:00:00 or 2-00:00:00)")
    days, parts = int(match["days"] or 0), [int(part) for part in (match["a"], match["b"], match["c"]) if part]
    if match["days"]:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:  # MM or MM:SS
        hours, (minutes, seconds) = 0, (parts + [0])[:2]
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


@dataclass(frozen=True)
class Cluster:
    """Where and how the trainings run.

    ``gpus_per_node`` 0 trains on CPUs (tests), ``procs_per_node`` ranks per node (default: one
    per GPU). ``sbatch_options``: more ``#SBATCH`` options, e.g. ``--constraint=h100``.
    ``setup``: shell lines every job runs first (``module load ...``, NCCL settings).
    ``stop_before``: seconds before the time limit at which a training is asked to stop.
    """

    nodes: int = 1
    gpus_per_node: int = 8
    procs_per_node: int | None = None
    time: str = "48:00:00"
    partition: str | None = None
    account: str | None = None
    sbatch_options: tuple[str, ...] = ()
    setup: tuple[str, ...] = ()
    rdzv_port: int = 29500
    stop_before: int = 900

    def __post_init__(self) -> None:
        for name, low in (("nodes", 1), ("gpus_per_node", 0), ("stop_before", 60)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}; got {getattr(self, name)}")
        if self.ranks_per_node < 1:
            raise ValueError("procs_per_node must be >= 1 (give it when gpus_per_node is 0)")
        if not 1024 <= self.rdzv_port <= 65535:
            raise ValueError(f"rdzv_port must lie in [1024, 65535]; got {self.rdzv_port}")
        limit = _slurm_seconds(self.time)
        if self.stop_before >= limit:
            raise ValueError(f"stop_before ({self.stop_before} s) must be shorter than the time limit {self.time} "
                             f"({limit} s)")
        for option in self.sbatch_options:
            if not option.startswith("--") or "\n" in option:
                raise ValueError(f"sbatch option {option!r}: expected one long option such as --constraint=h100")

    @property
    def ranks_per_node(self) -> int:
        return self.procs_per_node if self.procs_per_node is not None else self.gpus_per_node

    @property
    def ranks(self) -> int:
        return self.nodes * self.ranks_per_node

    def sbatch_lines(self, gpus_per_node: int) -> str:
        options = [f"--partition={self.partition}"] if self.partition else []
        options += [f"--account={self.account}"] if self.account else []
        options += [f"--gpus-per-node={gpus_per_node}"] if gpus_per_node else []
        return "\n".join(f"#SBATCH {option}" for option in [*options, *self.sbatch_options])


@dataclass(frozen=True)
class LaunchScript:
    """A rendered script: where it goes, its text, and for SLURM the training it submits (or None: finish)."""

    path: str
    text: str
    training: str | None


def render(template: str, values: dict[str, object]) -> str:
    """``template`` (a file under ``configs/launch``) with every ``{{key}}`` replaced by ``values[key]``."""
    text = (TEMPLATES / template).read_text()
    used = set(re.findall(r"\{\{(\w+)\}\}", text))
    if used != set(values):
        raise KeyError(f"template {template}: keys {sorted(used ^ set(values))} are not both used and given")
    return re.sub(r"\{\{(\w+)\}\}", lambda match: str(values[match[1]]), text)


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def check_trainings(stages, cluster: Cluster) -> None:
    """What a cluster job would only find out after queueing: batch sizes, relative paths, W&B credentials."""
    for stage in stages:
        run = stage.run
        world, micro, batch = cluster.ranks, run.train.micro_batch_sequences, run.train.global_batch_sequences
        if batch % (micro * world):
            raise ValueError(f"{run.name}: train.global_batch_sequences ({batch}) must be a multiple of "
                             f"train.micro_batch_sequences ({micro}) x {world} ranks ({cluster.nodes} nodes x "
                             f"{cluster.ranks_per_node}); change the micro-batch or the node count")
        paths = [*run.data.paths, *(path for held_out in run.evaluation.held_out for path in held_out.paths)]
        relative = [path for path in paths if "://" not in path and not os.path.isabs(path)]
        if relative:
            raise ValueError(f"{run.name}: data path {relative[0]!r} is relative, and a cluster job starts in "
                             "another folder; give it as an absolute path")
        if run.callbacks.wandb.enabled and not os.environ.get("WANDB_API_KEY"):
            raise ValueError(f"{run.name}: callbacks.wandb is enabled but WANDB_API_KEY is not set; the jobs take "
                             "their environment from where they are submitted, and OLMo-core needs it")


def _training_values(stage, cluster: Cluster, script: str) -> dict[str, object]:
    """What both training templates take; the run id (W&B, rendezvous) is the same for every start."""
    run = stage.run
    save_folder = run.train.save_folder
    return {
        "title": f"Train {run.name} ({stage.name.removeprefix('train ')}) into {save_folder}",
        "script": script,
        "nodes": cluster.nodes,
        "save_folder": shlex.quote(save_folder),
        "stop_file": STOP_FILE,
        "setup": "\n".join(cluster.setup),
        "wandb_run_id": f"{run.name}-{_short_hash(save_folder)}",
        "python": shlex.quote(sys.executable),
        "procs_per_node": cluster.ranks_per_node,
        "port": cluster.rdzv_port,
        "train_command": shlex.join(stage.launched),
    }


def launch_scripts(stages, out_dir: str, launcher: str, cluster: Cluster, finish_command: list[str]) -> list[LaunchScript]:
    """The rendered scripts of ``launcher`` for the training stages (and, for SLURM, the finishing job).

    ``out_dir`` is absolute; ``finish_command`` runs the rest of the pipeline once the trainings are done.
    """
    folder = os.path.join(out_dir, LAUNCH_FOLDER)
    logs = os.path.join(folder, "logs")
    trainings = [stage for stage in stages if stage.run is not None]
    check_trainings(trainings, cluster)
    scripts = []
    tag = _short_hash(out_dir)
    for stage in trainings:
        name = stage.name.removeprefix("train ")
        if launcher == "torchrun-nodes":
            path = os.path.join(folder, f"train-{name}-node.sh")
            values = _training_values(stage, cluster, path)
            values["rdzv_id"] = values["wandb_run_id"]
            scripts.append(LaunchScript(path, render("train-node.sh", values), name))
            continue
        path = os.path.join(folder, f"train-{name}.sbatch")
        values = _training_values(stage, cluster, path)
        values.update(name=name, job_name=f"og-{name}-{tag}", time=cluster.time, stop_before=cluster.stop_before,
                      log=os.path.join(logs, "%x-%j.out"), sbatch_lines=cluster.sbatch_lines(cluster.gpus_per_node),
                      cancel_check=stage.run.train.cancel_check_interval_steps, trained_file=TRAINED_FILE)
        scripts.append(LaunchScript(path, render("train.sbatch", values), name))
    if launcher == "slurm":
        path = os.path.join(folder, "finish.sbatch")
        values = {
            "title": f"Convert, evaluate and compare the trainings of {out_dir}",
            "script": path,
            "job_name": f"og-finish-{tag}",
            "time": cluster.time,
            "log": os.path.join(logs, "%x-%j.out"),
            "sbatch_lines": cluster.sbatch_lines(1 if cluster.gpus_per_node else 0),
            "save_folders": " ".join(shlex.quote(stage.run.train.save_folder) for stage in trainings),
            "trained_file": TRAINED_FILE,
            "setup": "\n".join(cluster.setup),
            "finish_command": f"exec {shlex.join(finish_command)}",
        }
        scripts.append(LaunchScript(path, render("finish.sbatch", values), None))
    return scripts


def _sbatch(arguments: list[str]) -> str:
    """Submit with ``sbatch --parsable``; the job id."""
    result = subprocess.run(["sbatch", "--parsable", *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"sbatch {shlex.join(arguments)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]


def launch(stages, out_dir: str, launcher: str, cluster: Cluster, finish_command: list[str], dry_run: bool) -> list[str]:
    """Render the scripts of ``launcher`` and, for SLURM, submit those still to run; the job ids submitted.

    Trainings already done (``train.done``) are not submitted; the finishing job waits for the
    others (``afterok``) and is cancelled by SLURM if one of them fails. With ``dry_run`` the
    scripts and the sbatch commands are printed and nothing is written or submitted.
    """
    scripts = launch_scripts(stages, out_dir, launcher, cluster, finish_command)
    done = {stage.name.removeprefix("train "): os.path.exists(stage.done) for stage in stages if stage.run is not None}
    if dry_run:
        for script in scripts:
            print(f"# ---- {script.path}{' (training done: not submitted)' if done.get(script.training) else ''}")
            print(script.text, end="")
        if launcher == "slurm":
            print("# ---- submitted with: sbatch --parsable <train script> (each), then sbatch --parsable "
                  "--dependency=singleton,afterok:<their job ids> --kill-on-invalid-dep=yes finish.sbatch")
        return []
    if launcher == "slurm" and shutil.which("sbatch") is None:
        raise ValueError("--launcher slurm: sbatch is not on PATH; run this on a SLURM login node (or see the scripts "
                         "with --dry-run)")
    os.makedirs(os.path.join(out_dir, LAUNCH_FOLDER, "logs"), exist_ok=True)
    for script in scripts:
        write_text_atomically(script.path, script.text)
        os.chmod(script.path, 0o755)
    if launcher == "torchrun-nodes":
        for script in scripts:
            print(f"{script.training}: start on each of the {cluster.nodes} nodes: HEAD=<first node> bash {script.path}")
        print("then, when both have finished (train.done in their save folders), run this command again without "
              "--launcher to convert, evaluate and compare")
        return []
    jobs = []
    for script in scripts[:-1]:
        if done[script.training]:
            print(f"train {script.training}: done, not submitted")
            continue
        jobs.append(_submitted(out_dir, script, [script.path]))
    finish = scripts[-1]
    # on the command line, --dependency replaces the script's: keep its singleton
    dependency = [f"--dependency=singleton,afterok:{':'.join(jobs)}", "--kill-on-invalid-dep=yes"] if jobs else []
    jobs.append(_submitted(out_dir, finish, [*dependency, finish.path]))
    print(f"watch: squeue -j {','.join(jobs)}; logs in {os.path.join(out_dir, LAUNCH_FOLDER, 'logs')}; "
          f"the report will be in {os.path.join(out_dir, 'report')}")
    return jobs


def _submitted(out_dir: str, script: LaunchScript, arguments: list[str]) -> str:
    job = _sbatch(arguments)
    what = f"train {script.training}" if script.training else "convert, evaluate, compare"
    print(f"{what}: submitted job {job} ({script.path})", flush=True)
    append_record(os.path.join(out_dir, LAUNCH_FOLDER, JOBS_FILE),
                  {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "job": job, "what": what, "script": script.path,
                   "sbatch": arguments})
    return job
