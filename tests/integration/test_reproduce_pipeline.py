"""`reproduce` pipeline presets: the 400B cluster commands (dry run) and the same commands run on one CPU."""

import json
import os
import shlex
import sys

import pytest

from olmoe_gatepro.cli import main
from olmoe_gatepro.pipelines.reproduce_pipeline import pipeline_stages


def _dry_run(capsys, *args) -> list[str]:
    """The printed lines but the cost estimate's (tests/test_cost.py)."""
    assert main(["reproduce", "--preset", "olmoe-1b-7b-400b", "--dry-run", *args]) == 0
    return [line for line in capsys.readouterr().out.splitlines() if not line.startswith("# cost ")]


def test_400b_dry_run_prints_every_command(tmp_path, capsys):
    lines = _dry_run(capsys, "--out", str(tmp_path), "--data.paths=[/data/mix/*.npy]")
    assert [line for line in lines if line.startswith("#")] == [
        "# train baseline", "# convert baseline", "# evaluate baseline", "# evaluate baseline (olmo-in-loop)",
        "# train gatepro", "# convert gatepro", "# evaluate gatepro", "# evaluate gatepro (olmo-in-loop)",
        "# inspect", "# compare", "# compare (olmo-in-loop)", "# learning curves",
    ]
    (train_baseline, convert, evaluate, in_loop, train_gatepro, _, evaluate_gatepro, in_loop_gatepro, inspect, compare,
     compare_in_loop, curves) = (shlex.split(line) for line in lines if not line.startswith("#"))
    assert train_baseline[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=gpu"]
    assert train_baseline[5:8] == ["-m", "olmoe_gatepro.cli", "train"]
    assert train_baseline[8].endswith("configs/olmoe-1b-7b/baseline.yaml")
    assert train_gatepro[8].endswith("configs/olmoe-1b-7b/gatepro.yaml")
    for command, name in ((train_baseline, "baseline"), (train_gatepro, "gatepro")):
        assert command[9:] == ["--data.paths=[/data/mix/*.npy]", f"--train.save_folder={tmp_path / name}"]
    assert convert[3:] == ["convert", str(tmp_path / "baseline"), "--out", str(tmp_path / "baseline/hf"), "--dtype", "bfloat16"]
    assert "--online" in evaluate and "--gatepro-penalty" not in evaluate and "--limit" not in evaluate
    assert "--tasks" not in evaluate  # the 400B preset evaluates all five
    assert evaluate_gatepro[-3:] == ["--gatepro-penalty", "0.0001", "--online"]
    assert in_loop[-2:] == ["--suite", "olmo-in-loop"] and "--online" not in in_loop
    assert in_loop_gatepro[-4:] == ["--gatepro-penalty", "0.0001", "--suite", "olmo-in-loop"]
    folders = [str(tmp_path / "baseline"), str(tmp_path / "gatepro")]
    assert inspect[3:] == ["inspect", *(f"{folder}/hf" for folder in folders), "--label", "baseline", "gatepro",
                           "--gatepro-penalty", "0", "0.0001", "--out", str(tmp_path / "report/routing")]
    assert compare[3:] == ["compare", *folders, "--out", str(tmp_path / "report")]
    assert compare_in_loop[3:] == ["compare", *folders, "--suite", "olmo-in-loop", "--out", str(tmp_path / "report/olmo-in-loop")]
    assert curves[3:] == ["compare", f"--curves=baseline={folders[0]}", f"--curves=gatepro={folders[1]}",
                          "--out", str(tmp_path / "report")]
    assert not os.listdir(tmp_path)  # a dry run writes nothing


def test_400b_dry_run_marks_finished_stages_and_takes_a_launcher(tmp_path, capsys):
    (tmp_path / "baseline").mkdir()
    (tmp_path / "baseline/train.done").write_text("")
    (tmp_path / "baseline/hf").mkdir()
    lines = _dry_run(capsys, "--out", str(tmp_path), "--shipped-eval-data",
                     "--launcher", "srun torchrun --nnodes=8 --nproc-per-node=8")
    assert lines[0] == "# train baseline (done, skipped)" and lines[2] == "# convert baseline (done, skipped)"
    assert lines[4] == "# evaluate baseline"
    assert lines[1].startswith("srun torchrun --nnodes=8 --nproc-per-node=8 -m olmoe_gatepro.cli train")
    assert "--online" not in lines[5]


def test_pipeline_refusals(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        main(["reproduce", "--preset", "olmoe-1b-7b-400b", "--dry-run", "--out", str(tmp_path), "--optim.lr=-1"])
    assert error.value.code == 2
    assert "baseline.yaml with overrides" in capsys.readouterr().err
    with pytest.raises(SystemExit) as error:  # GatePro overrides would reach the baseline too
        main(["reproduce", "--preset", "olmoe-1b-7b-400b", "--dry-run", "--out", str(tmp_path), "--gatepro.penalty=1"])
    assert error.value.code == 2 and "the gatepro section would change the baseline too" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reproduce", "--preset", "smoke", "--dry-run"])
    assert "runs in this process" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_a_stage_that_ends_well_without_its_output_stops_the_pipeline(tmp_path):
    """A training asked to stop exits 0 before its end: without train.done, nothing after it runs."""
    from olmoe_gatepro.pipelines.reproduce_pipeline import Stage, _run_stages

    marker = tmp_path / "converted"
    stages = [Stage("train x", ["true"], str(tmp_path / "x/train.done")),
              Stage("convert x", ["touch", str(marker)], str(marker))]
    with pytest.raises(RuntimeError, match="'train x' ended without writing .*train.done"):
        _run_stages(stages, dry_run=False)
    assert not marker.exists()


def test_olmo_core_tiny_pipeline_runs_on_the_cpu_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["reproduce", "--preset", "olmo-core-tiny", "--out", str(out)]) == 0
    report = out / "report"
    for name in ("table.md", "table.csv", "comparison.json", "deltas.png", "zero_token_count.png", "diversity.png"):
        assert (report / name).stat().st_size > 0, name
        assert (report / "olmo-in-loop" / name).stat().st_size > 0, name
    assert "## Verdict" in (report / "table.md").read_text()
    curves = (report / "learning_curves.csv").read_text().splitlines()
    assert (report / "learning_curves.png").stat().st_size > 0
    for name in ("baseline", "gatepro"):  # the training loss logged at each of the 4 steps of 128 tokens
        assert [row.split(",")[2:4] for row in curves if row.startswith(f"{name},training loss,")] == [
            [str(step), str(128 * step)] for step in range(1, 5)]
    routing = json.loads((report / "routing" / "routing.json").read_text())
    assert [(m["label"], m["gatepro"] and m["gatepro"]["penalty"]) for m in routing["models"]] == [
        ("baseline", None), ("gatepro", 0.05)]
    assert (report / "routing" / "routing_layers.png").stat().st_size > 0
    for name, enabled in (("baseline", False), ("gatepro", True)):
        records = [json.loads(line) for line in (out / name / "gatepro_metrics.jsonl").read_text().splitlines()]
        assert [record["step"] for record in records] == list(range(1, 5))
        assert all(record["gatepro_active"] is enabled for record in records)
        result = json.loads((out / name / "eval_results.json").read_text())
        assert result["limit"] == 2 and result["suite"] == "lm-eval-offline"
        assert set(result["tasks"]) == {"arc_challenge", "copa"}  # the CPU preset's two tasks
        in_loop = json.loads((out / name / "eval_results.olmo-in-loop.json").read_text())
        assert in_loop["limit"] == 2 and in_loop["suite"] == "olmo-in-loop"
        assert json.loads((out / name / "hf/olmoe_gatepro.json").read_text())["step"] == 4
    assert "Suite: lm-eval-offline; sample limit: 2." in (report / "table.md").read_text()
    assert "Suite: olmo-in-loop; sample limit: 2." in (report / "olmo-in-loop/table.md").read_text()
    capsys.readouterr()
    assert main(["reproduce", "--preset", "olmo-core-tiny", "--out", str(out)]) == 0
    finished = capsys.readouterr().out
    stages = pipeline_stages("olmo-core-tiny", str(out))
    assert all(f"{stage.name}: done" in finished for stage in stages)
