import json
import os
import shutil

import pytest
import torch

from olmoe_gatepro.cli import main


def _run(out):
    assert main(["reproduce", "--preset", "tiny", "--out", str(out)]) == 0


def routing_labels(routing: dict) -> list[str]:
    return [model["label"] for model in routing["models"]]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One whole tiny pipeline, shared by the tests that read it (they copy it before changing it)."""
    out = tmp_path_factory.mktemp("reproduce") / "a"
    _run(out)
    return out


def test_reproduce_writes_the_whole_report(first_run):
    report = first_run / "report"
    for name in ("table.md", "table.csv", "comparison.json", "deltas.png", "zero_token_count.png", "diversity.png",
                 "coactivation.png", "settings.json", "routing/routing.md", "routing/routing_layers.png",
                 "learning_curves.png", "learning_curves.csv"):
        assert (report / name).stat().st_size > 0, name
    for model in ("baseline-seed0", "baseline-seed1", "gatepro-seed0", "gatepro-seed1"):
        assert (first_run / model / "checkpoint" / "config.json").exists()
        assert (first_run / model / "gatepro_metrics.jsonl").read_text().count("\n") == 2
        assert (first_run / model / "samples.lm-eval.jsonl").exists()
    result = json.loads((first_run / "gatepro-seed1" / "eval_results.json").read_text())
    assert result["gatepro"]["penalty"] == 0.05 and result["limit"] == 2 and set(result["tasks"]) == {"arc_challenge", "copa"}
    assert json.loads((first_run / "baseline-seed0" / "eval_results.json").read_text())["gatepro"] is None
    table = (report / "table.md").read_text()
    assert "**gatepro** vs baseline:" in table and "(2 seeds)" in table  # the verdict, groups of seeds
    assert "| gatepro | on, lambda 0.05 | " in table and "| baseline | off | " in table  # routing per layer
    assert "## Routing of the same text (olmoe-gatepro inspect)" in table and "| gatepro-seed1 | lambda 0.05 |" in table
    routing = json.loads((report / "routing" / "routing.json").read_text())
    assert routing_labels(routing) == ["baseline-seed0", "baseline-seed1", "gatepro-seed0",
                                                               "gatepro-seed1"]
    assert all(model["tokens"] == 256 for model in routing["models"])
    curves = [row.split(",") for row in (report / "learning_curves.csv").read_text().splitlines()[1:]]
    assert {(row[0], row[1]) for row in curves} == {(model, curve) for model in routing_labels(routing)
                                                    for curve in ("training loss", "held-out loss")}
    assert len(curves) == 4 * 2 * 2  # two logged steps per run
    comparison = json.loads((report / "comparison.json").read_text())
    assert [row["label"] for row in comparison["rows"]] == ["baseline", "gatepro"]
    assert all(row["paired"] and len(row["runs"]) == 2 for row in comparison["rows"])
    assert comparison["paired_seeds"] and comparison["rows"][1]["columns"]["avg"]["method_test"]["seeds"] == [2, 2]


def test_refuses_a_folder_of_another_preset(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"preset": "smoke"}))
    with pytest.raises(SystemExit):
        main(["reproduce", "--preset", "tiny", "--out", str(out)])
    assert "holds a run with other settings" in capsys.readouterr().err


def test_ctrl_c_then_rerun_ends_with_the_weights_of_an_uninterrupted_run(first_run, tmp_path):
    """As if only the baselines were done: a real SIGINT (to the process group, workers included) while the
    GatePro arms train or are evaluated ends with exit 130; the rerun leaves the finished baselines as they
    were and finishes with the checkpoints of the uninterrupted run bit for bit, and the same report byte
    for byte (the GatePro arms trained, evaluated and inspected again in other processes: the determinism
    the smoke promises)."""
    import time

    from safetensors.torch import load_file

    from interrupting import CLI, interrupt_once

    out = tmp_path / "run"
    shutil.copytree(first_run, out, ignore=shutil.ignore_patterns(".reproduce.lock", "gatepro-seed*", "report"))
    finished = [out / "baseline-seed0" / "eval_results.json", out / "baseline-seed1" / "checkpoint" / "config.json"]
    finished_at = [os.stat(path).st_mtime_ns for path in finished]
    log = tmp_path / "cut.log"
    seen = []

    def busy():  # two seconds after the finished baselines were skipped: the GatePro arms are under way
        if log.exists() and "train baseline-seed1: done" in log.read_text():
            seen.append(time.monotonic())
            return seen[-1] - seen[0] >= 2
        return False

    code, output, seconds = interrupt_once([*CLI, "reproduce", "--preset", "tiny", "--out", str(out)], busy, log)
    assert code == 130 and "interrupted" in output and "Traceback" not in output, output[-3000:]
    assert not (out / "report" / "table.md").exists()
    _run(out)
    for model in ("baseline-seed0", "baseline-seed1", "gatepro-seed0", "gatepro-seed1"):
        expected, got = (load_file(folder / model / "checkpoint" / "model.safetensors") for folder in (first_run, out))
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[key], expected[key]) for key in expected), model
    assert [os.stat(path).st_mtime_ns for path in finished] == finished_at  # finished work is not redone
    for name in ("table.md", "table.csv", "comparison.json", "deltas.png", "routing/routing.csv", "learning_curves.csv"):
        assert (out / "report" / name).read_bytes() == (first_run / "report" / name).read_bytes(), name
