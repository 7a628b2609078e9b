import csv
import json
import shutil
import time

import pytest

from olmoe_gatepro import cli
from olmoe_gatepro.pipelines.presets import STUDY_PRESETS as PRESETS
from olmoe_gatepro.pipelines.study import SUMMARY_COLUMNS, activation_step, run_study


@pytest.fixture(scope="module")
def minimal_study(tmp_path_factory):
    """One uninterrupted minimal study: (its results, its folder); tests copy the folder before changing it."""
    folder = tmp_path_factory.mktemp("study") / "a"
    return run_study(PRESETS["minimal"], str(folder), echo=lambda _: None), folder


def test_minimal_study_writes_the_report_and_is_deterministic(minimal_study, tmp_path):
    first, folder = minimal_study
    assert cli.main(["study", "--preset", "minimal", "--out", str(tmp_path / "b")]) == 0
    for name in ("records.jsonl", "summary.csv", "summary.md", "preset.json", "zero_token_count.png", "diversity.png"):
        assert (folder / name).stat().st_size > 0, name
    with open(folder / "summary.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["setting"] for row in rows] == ["off", "lambda=0.1"]
    for column in SUMMARY_COLUMNS:
        assert f"{column}_mean" in rows[0] and f"{column}_std" in rows[0]
    assert float(rows[1]["flip_rate_mean"]) > 0
    second = [json.loads(line) for line in (tmp_path / "b" / "records.jsonl").read_text().splitlines()]
    assert [r["records"] for r in first] == [r["records"] for r in second]


def test_interrupted_study_resumes_without_rerunning_finished_runs(minimal_study, tmp_path):
    out = tmp_path / "study"
    shutil.copytree(minimal_study[1], out)
    lines = (out / "records.jsonl").read_text().splitlines()
    (out / "records.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # crash mid-line
    printed = []
    run_study(PRESETS["minimal"], str(out), echo=printed.append)
    assert [line for line in printed if line.startswith("[")] == [printed[0]] and "lambda=0.1" in printed[0]
    resumed = (out / "records.jsonl").read_text().splitlines()
    assert resumed[0] == lines[0] and json.loads(resumed[-1])["key"] == json.loads(lines[1])["key"]


def test_activation_step():
    layer = lambda zero: {"zero_token_count": zero}  # noqa: E731
    records = [{"step": 10, "layers": [layer(3), layer(0)]}, {"step": 20, "layers": [layer(0), layer(0)]}]
    assert activation_step(records) == 20
    assert activation_step(records[:1]) is None


def test_gpu_preset_refuses_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the refusal path does not apply")
    with pytest.raises(SystemExit):
        cli.main(["study", "--preset", "gpu"])
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_stdlib_corpus_is_large_and_bytes():
    from olmoe_gatepro.pipelines.tiny_run import corpus_tokens

    tokens = corpus_tokens("stdlib")
    assert tokens.numel() > 5_000_000 and int(tokens.max()) < 256


def test_ctrl_c_then_rerun_records_what_an_uninterrupted_study_records(minimal_study, tmp_path, capsys):
    """A real SIGINT during the second run: exit 130 (it was often swallowed inside a weakref
    callback); the rerun trains the rest and its records (every logged loss and routing metric of every
    run, which the weights determine) equal an uninterrupted study's bit for bit. Studies keep no weights."""
    from interrupting import CLI, interrupt_once
    from test_bad_inputs import _refused, _snapshot

    whole, whole_folder = minimal_study
    out = tmp_path / "cut"
    records = out / "records.jsonl"
    seen = []

    def busy():  # early in the second run (about 2 s long), where a weakref callback often swallowed the Ctrl-C
        if records.exists() and records.read_text().count("\n") >= 1:
            seen.append(time.monotonic())
            return seen[-1] - seen[0] >= 0.2
        return False

    code, output, seconds = interrupt_once([*CLI, "study", "--preset", "minimal", "--out", str(out)], busy,
                                           tmp_path / "cut.log")
    assert code == 130 and "interrupted" in output and "Traceback" not in output, output[-3000:]
    assert records.read_text().count("\n") == 1 and not (out / "summary.csv").exists(), output[-3000:]
    before = _snapshot(out)
    _refused(["study", "--preset", "minimal", "--num-experts", "4", "--out", str(out)], capsys,
             "holds a run with other settings", "run.num_experts: 8 there, 4 now")
    assert _snapshot(out) == before
    resumed = run_study(PRESETS["minimal"], str(out), echo=lambda _: None)
    assert resumed == whole
    assert (out / "records.jsonl").read_text() == (whole_folder / "records.jsonl").read_text()
    with pytest.raises(AssertionError):
        assert resumed[0]["records"] == resumed[1]["records"]  # the comparison can fail: the runs differ
