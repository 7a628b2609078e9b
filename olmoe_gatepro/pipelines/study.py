"""Does GatePro change routing, and at which lambda? Tiny OLMoEs that differ only in GatePro.

Every run of a study starts from the same initial weights and sees the same batches for a
seed; settings differ only in GatePro (off, lambda, top-m competitors, hard competition) and
in whether the load-balancing loss is on. Each run logs, per layer and every ``log_every``
steps, the metrics of ``tiny_run.LAYER_METRICS`` and the training and held-out loss. The
report folder holds ``records.jsonl`` (one line per finished run, appended atomically, so an
interrupted study resumes where it stopped), ``summary.csv``/``summary.md`` (final values,
mean and standard deviation over seeds) and Figure 4/5-style PNG plots.
"""

import csv
import dataclasses
import json
import math
import os
import statistics
import time

from olmoe_gatepro.jsonl import append_record, check_recorded_settings, repair, write_text_atomically
from olmoe_gatepro.pipelines.presets import StudyPreset
from olmoe_gatepro.pipelines.tiny_run import LAYER_METRICS, corpus_tokens, train_tiny

__all__ = ["run_study", "summarise", "activation_step"]


def _run_key(setting: str, lb_loss_weight: float, seed: int) -> str:
    return f"{setting} | lbl={lb_loss_weight:g} | seed={seed}"


def activation_step(records: list[dict]) -> int | None:
    """First logged step at which no layer has an unused expert; None when never reached."""
    for record in records:
        if all(layer["zero_token_count"] == 0 for layer in record["layers"]):
            return record["step"]
    return None


def run_study(preset: StudyPreset, out_dir: str, echo=print, num_experts: int | None = None) -> list[dict]:
    """Train every (setting, LBL weight, seed) not already in ``out_dir``; write the report.

    ``num_experts`` overrides the preset's (the GPU preset is meant to run at 64 and at 128).
    """
    if num_experts is not None:
        preset = dataclasses.replace(preset, run=dataclasses.replace(preset.run, num_experts=num_experts))
    os.makedirs(out_dir, exist_ok=True)
    records_path = os.path.join(out_dir, "records.jsonl")
    check_recorded_settings(os.path.join(out_dir, "preset.json"), _preset_dict(preset), f"--out {out_dir}")
    write_text_atomically(
        os.path.join(out_dir, "preset.json"), json.dumps(_preset_dict(preset), indent=2)
    )
    finished = {record["key"]: record for record in repair(records_path)}
    tokens = corpus_tokens(preset.run.corpus)
    plan = [
        (setting, lbl, seed)
        for lbl in preset.lb_loss_weights
        for setting in preset.settings
        for seed in preset.seeds
    ]
    started = time.monotonic()
    for index, (setting, lbl, seed) in enumerate(plan, start=1):
        key = _run_key(setting.name, lbl, seed)
        if key in finished:
            continue
        run = dataclasses.replace(preset.run, seed=seed, router_aux_loss_coef=lbl)
        records = train_tiny(run, setting.gatepro, tokens)
        result = {
            "key": key,
            "setting": setting.name,
            "gatepro": dataclasses.asdict(setting.gatepro),
            "lb_loss_weight": lbl,
            "seed": seed,
            "records": records,
        }
        append_record(records_path, result)
        finished[key] = result
        elapsed = time.monotonic() - started
        echo(f"[{index}/{len(plan)}] {key}: held-out loss {records[-1]['held_out_loss']:.4f} ({elapsed:.0f} s)")
    results = [finished[_run_key(s.name, lbl, seed)] for s, lbl, seed in plan]
    write_report(results, out_dir)
    echo(f"report in {out_dir}")
    return results


def _preset_dict(preset: StudyPreset) -> dict:
    return {
        "run": dataclasses.asdict(preset.run),
        "settings": [{"name": s.name, "gatepro": dataclasses.asdict(s.gatepro)} for s in preset.settings],
        "seeds": list(preset.seeds),
        "lb_loss_weights": list(preset.lb_loss_weights),
    }


SUMMARY_COLUMNS = (
    "flip_rate",
    "zero_token_count",
    "load_imbalance",
    "avg_cosine_similarity",
    "avg_angle_deg",
    "spectral_entropy",
    "loss",
    "held_out_loss",
    "activation_step",
)


def _final_values(result: dict) -> dict[str, float]:
    """A run's final values: layer metrics averaged over layers, losses, activation step."""
    final = result["records"][-1]
    values = {key: statistics.fmean(layer[key] for layer in final["layers"]) for key in LAYER_METRICS}
    values["loss"] = final["loss"]
    values["held_out_loss"] = final["held_out_loss"]
    step = activation_step(result["records"])
    values["activation_step"] = math.nan if step is None else step
    return values


def summarise(results: list[dict]) -> list[dict]:
    """One row per (setting, LBL weight): mean, std and seed count of each summary column."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for result in results:
        groups.setdefault((result["setting"], result["lb_loss_weight"]), []).append(_final_values(result))
    rows = []
    for (setting, lbl), finals in groups.items():
        row = {"setting": setting, "lb_loss_weight": lbl, "seeds": len(finals)}
        for column in SUMMARY_COLUMNS:
            values = [final[column] for final in finals]
            reached = [v for v in values if not math.isnan(v)]
            row[f"{column}_mean"] = statistics.fmean(reached) if reached else math.nan
            row[f"{column}_std"] = statistics.stdev(reached) if len(reached) > 1 else 0.0
            if column == "activation_step":
                row["activation_reached"] = len(reached)
        rows.append(row)
    return rows


def _markdown_table(rows: list[dict]) -> str:
    header = ["setting", "LBL"] + list(SUMMARY_COLUMNS)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [row["setting"], f"{row['lb_loss_weight']:g}"]
        for column in SUMMARY_COLUMNS:
            mean, std = row[f"{column}_mean"], row[f"{column}_std"]
            if column == "activation_step":
                cells.append(
                    "never" if math.isnan(mean) else f"{mean:.0f} ± {std:.0f} ({row['activation_reached']}/{row['seeds']})"
                )
            else:
                cells.append(f"{mean:.4g} ± {std:.2g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(results: list[dict], out_dir: str) -> None:
    """summary.csv, summary.md and the plots, each written whole or not at all."""
    rows = summarise(results)
    partial = os.path.join(out_dir, "summary.csv.partial")
    with open(partial, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, os.path.join(out_dir, "summary.csv"))
    write_text_atomically(os.path.join(out_dir, "summary.md"), _markdown_table(rows))
    from olmoe_gatepro.evaluation.plots import plot_diversity_curves, plot_zero_token_curves

    plot_zero_token_curves(results, os.path.join(out_dir, "zero_token_count.png"))
    plot_diversity_curves(results, os.path.join(out_dir, "diversity.png"))
