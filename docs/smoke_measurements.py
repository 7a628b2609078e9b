"""The smoke-run figures quoted in docs/statistics.md, from a finished smoke folder.

    PYTHONPATH=. python docs/smoke_measurements.py RUN_FOLDER     # e.g. runs/smoke after `make smoke`

Prints (1) the margin's signal-to-noise over accuracy's, per task, over every pair of the
smoke's runs compared as single checkpoints; (2) the per-seed partner co-activation and gate
similarity of every arm against the baseline, at the end of training (compare's measure) and
averaged over all logged steps, with the seeds per arm a paired method-level test would need
for the measured difference (Holm's first step among the four routing metrics, 1.25%).
"""

import itertools
import math
import statistics
import sys

import numpy as np

from olmoe_gatepro.evaluation import paired_stats
from olmoe_gatepro.evaluation.compare import ROUTING_METRICS, compare_arms, load_arms, routing_summary
from olmoe_gatepro.pipelines.presets import REPRODUCE_PRESETS

ARMS = tuple(name for name, _ in REPRODUCE_PRESETS["smoke"].arms)
SEEDS = REPRODUCE_PRESETS["smoke"].seeds


def margin_gain(root: str) -> None:
    runs = [f"{arm}-seed{seed}" for arm in ARMS for seed in SEEDS]
    ratios: dict[str, list[tuple[float, float, float]]] = {}
    for first, second in itertools.combinations(runs, 2):
        comparison = compare_arms(load_arms({first: [f"{root}/{first}"], second: [f"{root}/{second}"]}), root)
        for task, margin in comparison["rows"][1]["margins"].items():
            ratios.setdefault(task, []).append((margin["snr_ratio"], margin["snr"], margin["accuracy_snr"]))
    print("| task | pairs (ratio defined) | margin SNR / accuracy SNR: median (quartiles) | mean SNR, margin | mean SNR, accuracy |")
    print("| --- | --- | --- | --- | --- |")
    for task, values in ratios.items():
        finite = [ratio for ratio, _, _ in values if not math.isnan(ratio)]
        quartiles = statistics.quantiles(finite, n=4) if len(finite) > 3 else [math.nan] * 3
        print(f"| {task} | {len(values)} ({len(finite)}) | {quartiles[1]:.2f} ({quartiles[0]:.2f} to {quartiles[2]:.2f}) | "
              f"{statistics.fmean(s for _, s, _ in values):.2f} | {statistics.fmean(a for _, _, a in values):.2f} |")


def routing(root: str) -> None:
    arms = load_arms({arm: [f"{root}/{arm}-seed{seed}" for seed in SEEDS] for arm in ARMS})
    summary = {entry["label"]: entry for entry in routing_summary(arms, paired_seeds=True)}
    print("| arm minus baseline | metric | when | per-seed deltas | seeds needed (paired, 1.25%) |")
    print("| --- | --- | --- | --- | --- |")
    for arm in ARMS[1:]:
        for key, name, scale, _ in ROUTING_METRICS:
            for when, values in (("end of training", lambda label: [
                    scale * statistics.fmean(layer[key] for layer in run) for run in summary[label]["end_of_training"]]),
                                 ("all logged steps", lambda label: [
                    scale * statistics.fmean(layer[key] for record in run for layer in record["layers"])
                    for run in summary[label]["runs"]])):
                deltas = np.subtract(values(arm), values("baseline"))
                spread = float(np.std(deltas, ddof=1))
                needed = paired_stats.seeds_needed(float(deltas.mean()), spread, True, alpha=paired_stats.ALPHA / 4) \
                    if spread > 0 and deltas.mean() != 0 else None
                print(f"| {arm} | {name} | {when} | {', '.join(f'{d:+.3g}' for d in deltas)} | "
                      f"{'-' if needed is None else needed} |")


if __name__ == "__main__":
    margin_gain(sys.argv[1])
    print()
    routing(sys.argv[1])
