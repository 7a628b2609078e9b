"""Learning curves from two runs' metric files, per-checkpoint evaluation that skips done checkpoints, bad input."""

import dataclasses
import json
from pathlib import Path

import pytest

from olmoe_gatepro.cli import main
from olmoe_gatepro.evaluation.learning_curves import load_run_curves, switch_tokens
from olmoe_gatepro.olmo_core.run_config import load_run_config
from olmoe_gatepro.pipelines.checkpoint_evaluation import Checkpoint, evaluate_checkpoints, revision_checkpoints

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
TOKENS_PER_STEP = 8 * 64  # tiny.yaml


def _run_folder(folder: Path, overrides: list[str], lines: list[dict]) -> Path:
    folder.mkdir()
    run = load_run_config(TINY, overrides)
    (folder / "run_config.json").write_text(json.dumps(dataclasses.asdict(run)))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def _lines(copa: list[float], loss: list[float]) -> list[dict]:
    lines = []
    for index, (score, held) in enumerate(zip(copa, loss)):
        step = 2 * (index + 1)
        lines += [{"step": step, "train/CE loss": 5.0 - index},
                  {"step": step, "eval/downstream/copa (accuracy v2)": score, "eval/downstream/copa (CE loss v2)": 9.0,
                   "eval/downstream/copa (accuracy)": 0.0, "eval/lm/c4/CE loss": held, "eval/lm/c4/PPL": 99.0,
                   "throughput/device/TPS": 1.0}]
    return lines


@pytest.fixture
def two_runs(tmp_path):
    schedule = [f"--gatepro.on_from_tokens={2 * TOKENS_PER_STEP}", f"--gatepro.off_after_tokens={4 * TOKENS_PER_STEP}"]
    baseline = _run_folder(tmp_path / "baseline", ["--gatepro.enabled=false"], _lines([0.5, 0.6, 0.7], [4.0, 3.5, 3.0]))
    lines = _lines([0.55, 0.65, 0.8], [3.9, 3.4, 2.9]) + [{"step": 6, "eval/downstream/copa (accuracy v2)": 0.9}]
    gatepro = _run_folder(tmp_path / "gatepro", schedule, lines)
    return baseline, gatepro


def test_curves_are_read_from_metrics_files_by_tokens(two_runs):
    baseline, gatepro = two_runs
    curves = load_run_curves(str(gatepro), "gatepro")
    assert set(curves.series) == {"copa", "held-out c4 loss", "training loss"}  # only each task's accuracy
    tokens = [2 * TOKENS_PER_STEP, 4 * TOKENS_PER_STEP, 6 * TOKENS_PER_STEP]
    assert curves.series["copa"] == list(zip(tokens, [0.55, 0.65, 0.9]))  # of two lines at one step, the later
    assert curves.series["held-out c4 loss"] == list(zip(tokens, [3.9, 3.4, 2.9]))
    assert curves.switches == (2 * TOKENS_PER_STEP, 4 * TOKENS_PER_STEP)
    assert load_run_curves(str(baseline), "baseline").switches == ()


def test_compare_draws_both_runs_on_the_same_axes(two_runs, tmp_path):
    baseline, gatepro = two_runs
    out = tmp_path / "report"
    assert main(["compare", "--curves", f"baseline={baseline}", "--curves", f"gatepro={gatepro}", "--out", str(out)]) == 0
    assert (out / "learning_curves.png").stat().st_size > 10_000
    rows = (out / "learning_curves.csv").read_text().splitlines()
    assert rows[0] == "run,curve,step,tokens,value"
    assert f"baseline,copa,6,{6 * TOKENS_PER_STEP},0.7" in rows and f"gatepro,copa,6,{6 * TOKENS_PER_STEP},0.9" in rows
    assert len(rows) == 1 + 2 * 3 * 3


def test_switch_points_of_a_step_schedule():
    assert switch_tokens({"enabled": True, "on_from_steps": 0, "off_after_steps": 10}, 100) == (1000,)
    assert switch_tokens({"enabled": True, "on_from_tokens": 0, "off_after_tokens": None}, 100) == ()
    assert switch_tokens({"enabled": False, "on_from_tokens": 5}, 100) == ()


@pytest.mark.parametrize("argument, message", [
    ("baseline", "--curves 'baseline': expected LABEL=FOLDER"),
    ("=runs/x", "--curves '=runs/x': expected LABEL=FOLDER"),
    ("a={missing}", "no such folder"),
    ("a={empty}", "neither a training save folder (run_config.json) nor per-checkpoint results"),
])
def test_compare_curves_bad_input_exits_2_and_writes_nothing(argument, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argument = argument.format(missing=tmp_path / "missing", empty=tmp_path / "empty")
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--curves", argument, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_curves_need_a_metrics_file(tmp_path, capsys):
    folder = _run_folder(tmp_path / "run", [], [])
    (folder / "metrics.jsonl").unlink()
    with pytest.raises(SystemExit):
        main(["compare", "--curves", f"a={folder}", "--out", str(tmp_path / "out")])
    assert "metrics.jsonl not found" in capsys.readouterr().err


def test_revisions_give_tokens_from_their_names():
    checkpoints = revision_checkpoints("allenai/OLMoE-1B-7B-0924", ["step20000-tokens84B", "step5000-tokens20B"])
    assert [(c.name, c.step, c.tokens, c.revision) for c in checkpoints] == [
        ("step5000-tokens20B", 5000, 20 * 10**9, "step5000-tokens20B"),
        ("step20000-tokens84B", 20000, 84 * 10**9, "step20000-tokens84B")]
    with pytest.raises(ValueError, match="--revision main: cannot tell the tokens trained"):
        revision_checkpoints("allenai/OLMoE-1B-7B-0924", ["main"])


def test_each_checkpoint_is_evaluated_once_and_curves_drawn(tmp_path):
    from olmoe_gatepro.evaluation.results import result_record

    calls = []

    def evaluate(model, revision):
        calls.append(revision)
        score = {"step1-tokens4B": 0.25, "step2-tokens8B": 0.5, "step3-tokens12B": 0.75}[revision]
        tasks = {"copa": {"score": score, "stderr": 0.1, "samples": 4, "metric": "acc"}}
        result = result_record(label="olmoe", model=model, revision=revision, suite="lm-eval", limit=4, gatepro=None,
                               tasks=tasks)
        items = [{"task": "copa", "item": str(i), "correct": i < 4 * score} for i in range(4)]
        return result, items

    checkpoints = revision_checkpoints("org/model", ["step1-tokens4B", "step2-tokens8B"])
    out = tmp_path / "curve"
    evaluate_checkpoints(checkpoints, str(out), "lm-eval", "olmoe", evaluate, echo=lambda _: None)
    assert calls == ["step1-tokens4B", "step2-tokens8B"]
    result = json.loads((out / "step2-tokens8B" / "eval_results.json").read_text())
    assert result["checkpoint"] == {"step": 2, "tokens": 8 * 10**9, "gatepro_switch_tokens": []}
    checkpoints = revision_checkpoints("org/model", ["step1-tokens4B", "step2-tokens8B", "step3-tokens12B"])
    paths = evaluate_checkpoints(checkpoints, str(out), "lm-eval", "olmoe", evaluate, echo=lambda _: None)
    assert calls == ["step1-tokens4B", "step2-tokens8B", "step3-tokens12B"]  # the done ones skipped
    assert [Path(path).name for path in paths] == ["learning_curves.png", "learning_curves.csv"]
    assert load_run_curves(str(out), "olmoe").series["copa (lm-eval)"] == [(4 * 10**9, 0.25), (8 * 10**9, 0.5), (12 * 10**9, 0.75)]
    assert Checkpoint("x", "org/model", "r", 1, 1).is_olmo_core is False


@pytest.mark.parametrize("arguments, message", [
    (["org/model", "--revision", "a", "b"], "--revision is given 2 times: several revisions need --each-checkpoint"),
    (["org/model", "--each-checkpoint", "--revision", "main"], "--revision main: cannot tell the tokens trained"),
    (["{tmp}", "--each-checkpoint"], "no run_config.json, not an olmoe-gatepro training save folder"),
    (["org/model", "--each-checkpoint"], "--each-checkpoint needs an OLMo-core save folder here"),
    (["{tmp}", "--each-checkpoint", "--overwrite"], "--overwrite: --each-checkpoint skips the checkpoints"),
])
def test_eval_each_checkpoint_bad_input_exits_2(arguments, message, tmp_path, capsys):
    arguments = [argument.format(tmp=tmp_path) for argument in arguments]
    with pytest.raises(SystemExit) as exit_:
        main(["eval", *arguments, "--label", "x", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
