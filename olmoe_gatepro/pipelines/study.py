"""Does GatePro change routing, and at which lambda? Tiny OLMoEs that differ only in GatePro.

Every run of a study starts from the same initial weights and sees the same batches for a
seed; settings differ only in GatePro (off, lambda, top-m competitors, hard competition) and
in whether the load-balancing loss is on. Each run logs, per layer and every ``metrics_interval_steps``
steps, the metrics of ``tiny_run.LAYER_METRICS`` and the training and held-out loss. The
report folder holds ``records.jsonl`` (one line per finished run, appended atomically, so an
interrupted study resumes where it stopped: the runs recorded are kept, the one under way is
trained again from its start; a rerun with other settings is refused), ``summary.csv``/``summary.md`` (final values,
mean and standard deviation over seeds), ``differences.csv``/``differences.md`` (each setting
minus "off" at the same LBL weight, seed by seed, with 95% t intervals and Holm over every test
of the study: ``differences_to_off``) and Figure 4/5-style PNG plots.
"""

import csv
import dataclasses
import math
import os
import statistics
import time

from olmoe_gatepro.evaluation.compare import (END_OF_TRAINING, ROUTING_METRICS, difference_text, end_of_training_routing,
                                              routing_differences)
from olmoe_gatepro.evaluation.paired_stats import ALPHA, MIN_SEEDS, adjust_seed_level_tests, seed_level_test
from olmoe_gatepro.interrupts import raise_if_interrupted
from olmoe_gatepro.jsonl import append_record, atomic_file, keep_settings, repair, write_text_atomically
from olmoe_gatepro.pipelines.presets import StudyPreset
from olmoe_gatepro.pipelines.tiny_run import LAYER_METRICS, corpus_tokens, train_tiny

__all__ = ["run_study", "summarise", "differences_to_off", "activation_step"]


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
    keep_settings(os.path.join(out_dir, "preset.json"), _preset_dict(preset))  # a rerun continues this study only
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
        run = dataclasses.replace(preset.run, seed=seed, lb_loss_weight=lbl)
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
        raise_if_interrupted()  # a Ctrl-C Python swallowed while this run ended
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


DIFFERENCE_COLUMNS = (*((key, name, unit) for key, name, _, unit in ROUTING_METRICS), ("held_out_loss", "held-out loss", ""))


def differences_to_off(results: list[dict]) -> list[dict]:
    """Per (setting, LBL weight) other than "off": what it changed, against "off" at that LBL weight.

    Seed by seed (a seed sets the initial weights and the batches of every setting, so the test
    is paired): the routing at the end of training (``compare.end_of_training_routing``, mean over
    layers) and the final held-out loss, each a ``paired_stats.seed_level_test`` under
    ``tests[column]`` (``DIFFERENCE_COLUMNS``), with ``p_adjusted`` and ``significant`` after Holm
    over every test of the study (and only with ``MIN_SEEDS`` seeds and a spread above 0).
    """
    runs: dict[tuple[str, float], dict[int, list[dict]]] = {}
    for result in results:
        runs.setdefault((result["setting"], result["lb_loss_weight"]), {})[result["seed"]] = result["records"]
    rows = []
    for (setting, lbl), by_seed in runs.items():
        off = runs.get(("off", lbl))
        if setting == "off" or off is None:
            continue
        seeds = sorted(set(by_seed) & set(off))
        routing = routing_differences([end_of_training_routing(off[seed]) for seed in seeds],
                                      [end_of_training_routing(by_seed[seed]) for seed in seeds], paired=True)
        tests = {key: routing[key]["overall"] for key, *_ in ROUTING_METRICS}
        tests["held_out_loss"] = seed_level_test([off[seed][-1]["held_out_loss"] for seed in seeds],
                                                 [by_seed[seed][-1]["held_out_loss"] for seed in seeds], paired=True)
        rows.append({"setting": setting, "lb_loss_weight": lbl, "seeds": len(seeds), "tests": tests})
    adjust_seed_level_tests([test for row in rows for test in row["tests"].values()])  # re-adjusted: the study's family
    return rows


def _difference_cell(test: dict) -> str:
    if math.isnan(test["ci95_low"]):
        return difference_text(test)
    cell = f"{difference_text(test, interval='')}, p {test['p_adjusted']:.2g}"
    return f"**{cell}**" if test["significant"] else cell


def _differences_markdown(rows: list[dict]) -> str:
    tests = sum(len(row["tests"]) for row in rows)
    lines = [f"Each setting minus \"off\" at the same LBL weight, paired by seed: the mean difference, its 95% t "
             f"interval and the Holm-adjusted p over all {tests} tests of this study; **bold**: an effect "
             f"(adjusted p < {ALPHA:g}, with {MIN_SEEDS}+ seeds). Routing: the mean over layers of each run's "
             f"logged steps after {END_OF_TRAINING:.0%} of training (co-activation in points, zero-token experts per batch); "
             "held-out loss: the final one.", "",
             "| setting | LBL | seeds | " + " | ".join(f"{name} ({unit})" if unit else name
                                                   for _, name, unit in DIFFERENCE_COLUMNS) + " |",
             "|" + " --- |" * (len(DIFFERENCE_COLUMNS) + 3)]
    for row in rows:
        cells = [_difference_cell(row["tests"][key]) for key, *_ in DIFFERENCE_COLUMNS]
        lines.append(f"| {row['setting']} | {row['lb_loss_weight']:g} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _differences_csv_rows(rows: list[dict]) -> list[dict]:
    return [{"setting": row["setting"], "lb_loss_weight": row["lb_loss_weight"], "seeds": row["seeds"], "metric": key,
             **{field: row["tests"][key][field] for field in ("delta", "ci95_low", "ci95_high", "p_value", "p_adjusted",
                                                              "significant", "zero_spread")}}
            for row in rows for key, *_ in DIFFERENCE_COLUMNS]


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


def _write_csv(path: str, rows: list[dict]) -> None:
    """``rows`` (dicts with the same keys) as a CSV file with a header, written whole or not at all."""
    with atomic_file(path) as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_report(results: list[dict], out_dir: str) -> None:
    """summary.csv/md, differences.csv/md and the plots, each written whole or not at all."""
    rows = summarise(results)
    _write_csv(os.path.join(out_dir, "summary.csv"), rows)
    write_text_atomically(os.path.join(out_dir, "summary.md"), _markdown_table(rows))
    differences = differences_to_off(results)
    if differences:
        _write_csv(os.path.join(out_dir, "differences.csv"), _differences_csv_rows(differences))
        write_text_atomically(os.path.join(out_dir, "differences.md"), _differences_markdown(differences))
    from olmoe_gatepro.evaluation.curves import routing_curves
    from olmoe_gatepro.evaluation.plots import plot_diversity_curves, plot_zero_token_curves

    curves = [routing_curves(_legend_label(result["setting"], result["lb_loss_weight"]), result["records"],
                             colour=result["setting"], dashed=not result["lb_loss_weight"]) for result in results]
    plot_zero_token_curves(curves, os.path.join(out_dir, "zero_token_count.png"))
    plot_diversity_curves(curves, os.path.join(out_dir, "diversity.png"))


def _legend_label(setting: str, lb_loss_weight: float) -> str:
    return f"{setting}, LBL {lb_loss_weight:g}" if lb_loss_weight else f"{setting}, no LBL"
