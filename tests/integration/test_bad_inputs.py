"""Every command, fed bad input: exit code 2, one line naming the value and where it came from,
no traceback, and nothing written or lost."""

import json
import os
import subprocess
import sys

import pytest

from olmoe_gatepro.cli import main

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
TINY_CONFIG = os.path.join(CONFIGS, "tiny-test.yaml")


def _snapshot(folder):
    """Every file under ``folder`` with its bytes: nothing written means the same snapshot."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as file:
                found[os.path.relpath(path, folder)] = file.read()
    return found


def _refused(argv, capsys, *expected):
    """Run the command; it must exit 2 with one error line containing every ``expected`` text."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(error_lines) == 1, err
    for text in expected:
        assert text in error_lines[0], (text, error_lines[0])
    return error_lines[0]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("x")
    return tmp_path


def _write_config(folder, name, text):
    path = folder / name
    path.write_text(text)
    return str(path)


SMOKE_CASES = [
    (["--steps", "0"], "--steps: steps must be >= 1; got 0"),
    (["--top-k", "99"], "--top-k: top_k must lie in [1, num_experts = 16]; got 99"),
    (["--corpus", "foo"], "--corpus: corpus must be one of small, stdlib; got 'foo'"),
    (["--n-heads", "3"], "d_model (64) must be divisible by n_heads (3)"),
    (["--lr", "inf"], "--lr: lr must be finite"),
    (["--gatepro-penalty", "-1"], "--gatepro-penalty: penalty must be finite and >= 0"),
    (["--gatepro-num-competitors", "16"], "--gatepro-num-competitors (16) must be < --num-experts (16)"),
    (["--out", "a-file"], "--out a-file: exists and is not a folder"),
    (["--stepz", "3"], "unrecognized argument '--stepz'; did you mean --steps?"),
]


@pytest.mark.parametrize("flags, message", SMOKE_CASES)
def test_smoke(workdir, capsys, flags, message):
    before = _snapshot(workdir)
    _refused(["smoke", *flags], capsys, message)
    assert _snapshot(workdir) == before


def test_study(workdir, capsys):
    _refused(["study", "--preset", "nope"], capsys, "unknown preset 'nope'; choose one of cpu, gpu")
    _refused(["study", "--preset", "minimal", "--num-experts", "1"], capsys, "--num-experts must be >= 2; got 1")
    _refused(["study", "--preset", "minimal", "--out", "a-file/x"], capsys, "--out a-file/x: cannot be created")
    assert sorted(os.listdir(workdir)) == ["a-file"]


@pytest.mark.parametrize(
    "files, override, expected",
    [
        ({}, "--train.compile=maybe", ["train.compile: expected true or false, got 'maybe'"]),
        ({}, "--optim.lr=.inf", ["optim.lr: expected a finite number, got inf"]),
        ({}, "--data.num_workers=-1", ["num_workers must be >= 0; got -1"]),
        ({}, "--train.sharding=hsdp", ["hsdp_shard_degree is needed"]),
        ({}, "--data.paths=[a, b", ["override --data.paths=[a, b: the value is not valid YAML"]),
        ({}, "--gatepro.penalty=[1", ["override --gatepro.penalty=[1: the value is not valid YAML"]),
        ({}, "--model.rope_theta=0", ["rope_theta must be >= 1; got 0"]),
        ({}, "--data.eos_token_id=300", ["data.eos_token_id (300) must be < model.vocab_size (256)"]),
    ],
)
def test_train_config_values(workdir, capsys, files, override, expected):
    _refused(["train", TINY_CONFIG, override, "--dry-run"], capsys, *expected)


def test_train_hsdp_shard_degree_zero(workdir, capsys):
    _refused(["train", TINY_CONFIG, "--train.sharding=hsdp", "--train.hsdp_shard_degree=0", "--dry-run"], capsys,
             "hsdp_shard_degree must be >= 1; got 0")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("inherit: ''\nname: x\n", ["child.yaml: inherit: expected the path of another config file; got ''"]),
        ("inherit: [a]\nname: x\n", ["child.yaml: inherit: expected the path of another config file"]),
        ("inherit: nowhere.yaml\nname: x\n", ["child.yaml: inherit: 'nowhere.yaml' not found"]),
        ("inherit: child.yaml\nname: x\n", ["makes a cycle", "child.yaml -> "]),
        ("model:\n  d_model: 32\n", ["missing required key 'name'"]),
        ("name: x\nmodel: {d_model: [32\n", ["not valid YAML"]),
    ],
)
def test_train_config_files(workdir, capsys, text, expected):
    path = _write_config(workdir, "child.yaml", text)
    _refused(["train", path, "--dry-run"], capsys, *expected)


def test_train_inherit_cycle_through_two_files(workdir, capsys):
    _write_config(workdir, "a.yaml", "inherit: b.yaml\nname: a\n")
    _write_config(workdir, "b.yaml", "inherit: a.yaml\nname: b\n")
    _refused(["train", str(workdir / "a.yaml"), "--dry-run"], capsys, "makes a cycle", "a.yaml -> ", "b.yaml -> ")


def test_train_unknown_flag_and_missing_file(workdir, capsys):
    _refused(["train", "nowhere.yaml"], capsys, "cannot read config nowhere.yaml")
    _refused(["train", TINY_CONFIG, "--dryrun"], capsys, "unrecognized argument '--dryrun'; did you mean --dry-run?")


def test_reproduce(workdir, capsys):
    _refused(["reproduce", "--preset", "tiny", "--out", "a-file"], capsys, "--out a-file: exists and is not a folder")
    _refused(["reproduce", "--preset", "tiny", "--out", "a-file/run"], capsys, "--out a-file/run: cannot create")
    _refused(["reproduce", "--output", "x"], capsys, "unrecognized argument '--output'; did you mean --out?")
    _refused(["reproduce", "--preset", "olmo-core-tiny", "--gatepro.enabled=true", "--dry-run"], capsys,
             "override --gatepro.enabled=true: the gatepro section would change the baseline too")
    _refused(["reproduce", "--preset", "olmo-core-tiny", "--optim.lr=[1", "--dry-run"], capsys,
             "the value is not valid YAML")
    _refused(["reproduce", "--preset", "nope"], capsys, "unknown preset 'nope'")
    run = workdir / "run"
    run.mkdir()
    (run / "settings.json").write_text("{cut short")
    _refused(["reproduce", "--preset", "tiny", "--out", str(run)], capsys, "settings.json is not readable JSON")
    assert (run / "settings.json").read_text() == "{cut short"  # the user's file is left alone


def test_reproduce_refuses_a_folder_another_run_holds(workdir, capsys):
    from olmoe_gatepro.pipelines.reproduce import run_folder_lock

    held = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom olmoe_gatepro.pipelines.reproduce import run_folder_lock\n"
         "with run_folder_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)", str(workdir / "run")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline().strip() == "held"
        with pytest.raises(RuntimeError, match="another reproduce run holds"):
            with run_folder_lock(str(workdir / "run")):
                pass
        assert main(["reproduce", "--preset", "tiny", "--out", str(workdir / "run")]) == 1
        assert "another reproduce run holds" in capsys.readouterr().err
    finally:
        held.kill()
        held.wait()
    with run_folder_lock(str(workdir / "run")):  # free again once the holder is gone
        pass


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from olmoe_gatepro.pipelines.presets import TinyRunConfig
    from olmoe_gatepro.pipelines.tiny_run import build_tiny_olmoe, save_checkpoint

    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(build_tiny_olmoe(TinyRunConfig(n_layers=1, num_experts=4, top_k=2, d_model=32, n_heads=2,
                                                   expert_hidden_size=16)), str(folder))
    return str(folder)


def test_eval(workdir, capsys, checkpoint):
    common = ["--label", "a", "--tasks", "copa", "--limit", "2"]
    _refused(["eval", "runs/nowhere/hf", *common, "--out", "o"], capsys, "model runs/nowhere/hf: no such folder")
    _refused(["eval", "a-file", *common, "--out", "o"], capsys, "model a-file: a file")
    os.mkdir("empty")
    _refused(["eval", "empty", *common, "--out", "o"], capsys, "model empty: a folder without config.json")
    _refused(["eval", checkpoint, *common, "--out", "a-file"], capsys, "--out a-file: exists and is not a folder")
    _refused(["eval", checkpoint, "--label", "a", "--suite", "olmo-in-loop", "--out", "a-file/x"], capsys,
             "--out a-file/x: cannot be created")  # checked before the (long) evaluation, not after
    _refused(["eval", checkpoint, *common, "--limit", "0", "--out", "o"], capsys, "--limit must be >= 1; got 0")
    _refused(["eval", checkpoint, *common, "--batch-size", "0", "--out", "o"], capsys, "--batch-size must be >= 1")
    _refused(["eval", checkpoint, "--label", " ", "--out", "o"], capsys, "--label must not be empty")
    _refused(["eval", checkpoint, *common, "--gatepro-penalty", "nan", "--out", "o"], capsys, "--gatepro-penalty")
    assert sorted(os.listdir(workdir)) == ["a-file", "empty"]  # nothing written


def test_eval_keeps_an_existing_result_without_overwrite(workdir, capsys, checkpoint):
    common = ["--label", "a", "--tasks", "copa", "--limit", "2", "--out", "run"]
    (workdir / "run").mkdir()
    (workdir / "run" / "eval_results.json").write_text('{"an earlier result": true}')
    before = _snapshot(workdir / "run")
    _refused(["eval", checkpoint, *common], capsys, "--out run already holds eval_results.json; pass --overwrite")
    assert _snapshot(workdir / "run") == before
    assert main(["eval", checkpoint, *common, "--overwrite"]) == 0
    assert json.loads((workdir / "run" / "eval_results.json").read_text())["label"] == "a"


def test_eval_rejects_a_bad_environment_switch(workdir, capsys, monkeypatch, checkpoint):
    monkeypatch.setenv("OLMOE_GATEPRO", "maybe")
    _refused(["eval", checkpoint, "--label", "a", "--out", "o"], capsys,
             "OLMOE_GATEPRO='maybe': expected one of 1/true/on/yes or 0/false/off/no")
    monkeypatch.setenv("OLMOE_GATEPRO", "1")
    monkeypatch.setenv("OLMOE_GATEPRO_PENALTY", "-2")
    _refused(["eval", checkpoint, "--label", "a", "--out", "o"], capsys, "penalty must be finite and >= 0")
    assert not os.path.exists("o")


def test_convert(workdir, capsys):
    _refused(["convert", "nowhere", "--out", "hf"], capsys, "checkpoint nowhere: no such folder")
    _refused(["convert", str(workdir), "--out", "a-file"], capsys, "a-file already exists")
    _refused(["convert", str(workdir), "--out", "hf", "--model.d_model=8"], capsys, "overrides", "need --config")
    _refused(["convert", str(workdir), "--out", "hf", "--config", TINY_CONFIG, "--model.d_model=[8"], capsys,
             "not valid YAML")
    assert sorted(os.listdir(workdir)) == ["a-file"]


def test_convert_never_touches_a_partial_folder_it_did_not_make(workdir, capsys):
    foreign = workdir / "hf.partial"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("the user's")
    _refused(["convert", str(workdir), "--out", str(workdir / "hf"), "--config", TINY_CONFIG], capsys,
             "hf.partial exists and was not left by olmoe-gatepro convert")
    assert (foreign / "precious.txt").read_text() == "the user's"


def test_prepare_data(workdir, capsys):
    (workdir / "text.txt").write_text("hello")
    _refused(["prepare-data", "missing.txt", "--out", "tokens"], capsys, "input file(s) not found: ['missing.txt']")
    _refused(["prepare-data", "text.txt", "--out", "tokens", "--tokens-per-file", "0"], capsys,
             "--tokens-per-file must be >= 1; got 0")
    _refused(["prepare-data", "text.txt", "--out", "tokens", "--eos-token-id", "-1"], capsys,
             "--eos-token-id must be >= 0; got -1")
    assert sorted(os.listdir(workdir)) == ["a-file", "text.txt"]


def test_compare(workdir, capsys):
    _refused(["compare", "nowhere", "nowhere2"], capsys, "cannot read result nowhere")
    _refused(["compare", "only-one"], capsys, "two or more results")


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import olmoe_gatepro.cli as cli

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupted)
    assert cli.main(["compare", "a", "b"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "olmoe-gatepro compare: interrupted"


def test_version_and_presets_in_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("olmoe-gatepro ")
    # Outside the tests (no conftest), the package offers only its real presets.
    shown = subprocess.run([sys.executable, "-m", "olmoe_gatepro.cli", "reproduce", "--help"],
                           capture_output=True, text=True, check=True).stdout
    help_text = " ".join(shown.split())  # as one line, whatever the wrapping
    assert "{olmo-core-tiny,olmoe-1b-7b-400b,smoke}" in help_text and "(default: smoke)" in help_text
    with pytest.raises(SystemExit):
        main(["smoke", "--help"])
    assert "training steps per model (default: 40)" in " ".join(capsys.readouterr().out.split())


def test_the_environment_hook_does_not_import_torch():
    code = "import sys; print('torch' in sys.modules)"
    env = {**os.environ, "OLMOE_GATEPRO": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    hooked = "import sys; print(any(type(f).__name__ == '_GateProImportHook' for f in sys.meta_path))"
    assert subprocess.run([sys.executable, "-c", hooked], env=env, capture_output=True, text=True).stdout.strip() == "True"


def test_settings_json_mismatch_names_the_file(workdir, capsys):
    run = workdir / "run"
    run.mkdir()
    (run / "settings.json").write_text(json.dumps({"preset": "smoke"}))
    _refused(["reproduce", "--preset", "tiny", "--out", str(run)], capsys, "holds a run with other settings",
             "settings.json")
