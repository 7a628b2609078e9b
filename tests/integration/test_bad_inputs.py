"""Every command, fed bad input: exit code 2, one line naming the value and where it came from,
no traceback, and nothing written or lost."""

import contextlib
import json
import os
import re
import subprocess
import sys

import pytest

from olmoe_gatepro.cli import main

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
TINY_CONFIG = os.path.join(CONFIGS, "tiny.yaml")


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
    _refused(["reproduce", "--preset", "tiny", "--out", str(run)], capsys,
             "settings.json, line 1, column 2: not valid JSON (Expecting property name enclosed in double quotes); remove it")
    assert (run / "settings.json").read_text() == "{cut short"  # the user's file is left alone


def test_reproduce_refuses_a_folder_another_run_holds(workdir, capsys):
    from olmoe_gatepro.pipelines.run_folder import run_folder_lock

    held = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom olmoe_gatepro.pipelines.run_folder import run_folder_lock\n"
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


# ---------------------------------------------------------------------------------------------
# The Python API: a wrong type is a TypeError, a wrong value a ValueError, each naming the argument.

def _tiny_olmoe():
    from olmoe_gatepro.pipelines.tiny_run import TinyRunConfig, build_tiny_olmoe

    return build_tiny_olmoe(TinyRunConfig(n_layers=1, num_experts=4, top_k=2, d_model=16, n_heads=2,
                                          expert_hidden_size=8))


def _logits(*shape):
    """Random logits (or weights) of ``shape``; no shape: a 0-dim tensor."""
    import torch

    return torch.randn(*shape) if shape else torch.tensor(0.5)


def _call(name, *args, **kwargs):
    import olmoe_gatepro

    return lambda: getattr(olmoe_gatepro, name)(*args, **kwargs)


def _attach(gatepro, trainer="trainer", **keywords):
    from olmoe_gatepro.transformers.trainer_callback import GateProTrainerCallback

    class Trainer:  # what attach reads of a transformers.Trainer
        def add_callback(self, callback):
            raise AssertionError("attached despite a bad argument")

    return lambda: GateProTrainerCallback.attach(Trainer() if trainer == "trainer" else trainer, gatepro, **keywords)


def _config(cls="GateProConfig", **settings):
    from olmoe_gatepro.core import config

    return lambda: getattr(config, cls)(**settings)


def _router_state(name, *args, **kwargs):
    from olmoe_gatepro.core import router_state

    return lambda: getattr(router_state, name)(*args, **kwargs)


def _olmo_core_callback(**fields):
    def make():
        from olmoe_gatepro.olmo_core.callback import GateProCallback

        GateProCallback(**fields)

    return make


def _run_config(**fields):
    def make():
        from olmoe_gatepro.core.config import GateProRunConfig

        return GateProRunConfig(**fields)

    return make


API_CASES = {  # id: (call, error type, the message's start)
    "patch_transformers model=str": (_call("patch_transformers", model="path"), TypeError,
                                     "patch_transformers: model must be a torch.nn.Module; got 'path' (str) (load it"),
    "patch_transformers config=dict": (_call("patch_transformers", config={"penalty": 1e-3}), TypeError,
                                       "patch_transformers: config must be a GateProConfig (or None); got {'penalty'"),
    "patch_transformers config=run config": (
        lambda: _call("patch_transformers", config=_run_config(enabled=True)())(), TypeError,
        "patch_transformers: config is a GateProRunConfig, whose schedule a patch does not run"),
    "patch_transformers families=[1]": (_call("patch_transformers", families=["olmoe", 1]), TypeError,
                                        "families must be a family name or a list of them"),
    "patch_transformers families=[]": (_call("patch_transformers", families=[]), ValueError,
                                       "families is empty: nothing would be patched"),
    "patch_transformers families=typo": (_call("patch_transformers", families="olmo"), ValueError,
                                         "unknown or unsupported family ['olmo']"),
    "patch_transformers penalty=str": (_call("patch_transformers", penalty="1e-3"), TypeError,
                                       "GateProConfig.penalty must be a Python number; got '1e-3' (str)"),
    "patch_transformers hard=yes": (_call("patch_transformers", hard="yes"), TypeError,
                                    "GateProConfig.hard must be True or False; got 'yes' (str)"),
    "patch_transformers unknown setting": (_call("patch_transformers", penalti=1e-3), ValueError,
                                           "unknown GatePro setting(s) ['penalti']"),
    "unpatch_transformers model=str": (_call("unpatch_transformers", "path"), TypeError,
                                       "unpatch_transformers: model must be a torch.nn.Module; got 'path'"),
    "patch_olmo_core model=str": (_call("patch_olmo_core", model="path"), TypeError,
                                  "patch_olmo_core: model must be a torch.nn.Module; got 'path' (str)"),
    "patch_olmo_core config=str": (_call("patch_olmo_core", config="gatepro"), TypeError,
                                   "patch_olmo_core: config must be a GateProConfig (or None); got 'gatepro'"),
    "patch_olmo_core router_classes=class": (_call("patch_olmo_core", router_classes=int), TypeError,
                                             "patch_olmo_core: router_classes must be a list of router classes"),
    "patch_olmo_core router_classes=[int]": (_call("patch_olmo_core", router_classes=[int]), TypeError,
                                             "patch_olmo_core: router_classes ['int'] have no get_expert_logits"),
    "patch_olmo_core router_classes=[]": (_call("patch_olmo_core", router_classes=[]), ValueError,
                                          "patch_olmo_core: router_classes is empty"),
    "unpatch_olmo_core model=str": (_call("unpatch_olmo_core", "path"), TypeError,
                                    "unpatch_olmo_core: model must be a torch.nn.Module; got 'path'"),
    "set_gatepro(None)": (_call("set_gatepro", None, enabled=False), TypeError,
                          "model must be a torch.nn.Module; got None (NoneType)"),
    "set_gatepro unpatched model": (lambda: _call("set_gatepro", _tiny_olmoe(), enabled=False)(), RuntimeError,
                                    "OlmoeForCausalLM has no GatePro-routed router: call"),
    "gatepro_settings(str)": (lambda: _call("gatepro_settings", "model")().__enter__(), TypeError,
                              "model must be a torch.nn.Module; got 'model' (str)"),
    "refresh_partners(None)": (_call("refresh_partners", None), TypeError, "model must be a torch.nn.Module"),
    "refresh_partners step=str": (lambda: _call("refresh_partners", _patched_tiny_olmoe(), "3")(), TypeError,
                                  "step must be an int; got '3' (str)"),
    "refresh_partners step<0": (lambda: _call("refresh_partners", _patched_tiny_olmoe(), -1)(), ValueError,
                                "step must be an int >= 0; got -1"),
    "begin_step enabled=str": (lambda: _router_state("begin_step", _patched_tiny_olmoe(), enabled="on", step=1,
                                                     record=False)(), TypeError, "enabled must be True or False"),
    "gatepro_logits 0-dim logits": (lambda: _call("gatepro_logits", _logits(), _logits(4, 3))(), ValueError,
                                    "logits must have shape (..., N), one logit per expert; got a 0-dim tensor"),
    "gatepro_logits logits=list": (lambda: _call("gatepro_logits", [[1.0, 2.0]], _logits(2, 3))(), TypeError,
                                   "logits must be a torch.Tensor of shape (..., N); got list"),
    "gatepro_logits int logits": (lambda: _call("gatepro_logits", _logits(3, 4).long(), _logits(4, 3))(), TypeError,
                                  "logits must be a floating-point tensor of shape (..., N); got dtype torch.int64"),
    "gatepro_logits weight=list": (lambda: _call("gatepro_logits", _logits(3, 2), [[1.0], [2.0]])(), TypeError,
                                   "router_weight must be a torch.Tensor of shape (N, d); got list"),
    "gatepro_logits partners out of range": (
        lambda: _call("gatepro_logits", _logits(5, 4), None, partners=_partners([1, 2, 3, 9]))(), ValueError,
        "partners must hold expert indices in [0, 3]; got 9"),
    "gatepro_logits negative partner": (
        lambda: _call("gatepro_logits", _logits(5, 4), None, partners=_partners([1, -1, 3, 0]))(), ValueError,
        "partners must hold expert indices in [0, 3]; got -1"),
    "gatepro_logits float partners": (
        lambda: _call("gatepro_logits", _logits(5, 4), None, partners=_partners([1, 2, 3, 0]).float())(), TypeError,
        "partners must be an int64 (or int32) tensor"),
    "gatepro_logits partners=list": (lambda: _call("gatepro_logits", _logits(5, 4), None, partners=[1, 2, 3, 0])(),
                                     TypeError, "partners must be a torch.Tensor"),
    "gatepro_logits partners wrong N": (
        lambda: _call("gatepro_logits", _logits(5, 4), None, partners=_partners([1, 0]))(), ValueError,
        "partners must have shape (N,) or (N, m) with N=4; got (2,)"),
    "gatepro_logits hard=yes": (lambda: _call("gatepro_logits", _logits(5, 4), _logits(4, 3), hard="yes")(), TypeError,
                                "hard must be True or False; got 'yes' (str)"),
    "gatepro_logits penalty=tensor": (lambda: _call("gatepro_logits", _logits(5, 4), _logits(4, 3), _logits())(),
                                      TypeError, "penalty (lambda) must be a Python number"),
    "gatepro_logits penalty=nan": (lambda: _call("gatepro_logits", _logits(5, 4), _logits(4, 3), float("nan"))(),
                                   ValueError, "penalty (lambda) must be finite and >= 0; got nan"),
    "gatepro_logits neither weight nor partners": (lambda: _call("gatepro_logits", _logits(5, 4), None)(), ValueError,
                                                   "gatepro_logits needs router_weight or partners; both are None"),
    "competition_partners m=1.0": (lambda: _call("competition_partners", _logits(4, 3), 1.0)(), TypeError,
                                   "num_competitors (N = 4 experts) must be an int; got 1.0 (float)"),
    "competition_partners m=N": (lambda: _call("competition_partners", _logits(4, 3), 4)(), ValueError,
                                 "num_competitors (N = 4 experts) must be an int in [1, 3]; got 4"),
    "competition_partners int weight": (lambda: _call("competition_partners", _logits(4, 3).long())(), TypeError,
                                        "router_weight must be a floating-point tensor of shape (N, d)"),
    "GateProConfig enabled=1": (_config(enabled=1), TypeError, "GateProConfig.enabled must be True or False; got 1"),
    "GateProConfig penalty=str": (_config(penalty="1e-4"), TypeError, "GateProConfig.penalty must be a Python number"),
    "GateProConfig penalty=inf": (_config(penalty=float("inf")), ValueError,
                                  "GateProConfig.penalty must be finite and >= 0; got inf"),
    "GateProConfig m=0": (_config(num_competitors=0), ValueError, "GateProConfig.num_competitors must be an int >= 1"),
    "GateProConfig refresh=2.5": (_config(partner_refresh_steps=2.5), TypeError,
                                  "GateProConfig.partner_refresh_steps must be an int; got 2.5"),
    "GateProConfig.replace typo": (lambda: _config()().replace(penalti=1), ValueError,
                                   "unknown GatePro setting(s) ['penalti']"),
    "GateProRunConfig on_from_tokens=None": (_config("GateProRunConfig", on_from_tokens=None), TypeError,
                                             "GateProRunConfig.on_from_tokens must be an int; got None"),
    "GateProRunConfig off<=on": (_config("GateProRunConfig", on_from_steps=5, off_after_steps=5), ValueError,
                                 "off_after_steps must be None or an int > on_from_steps (5); got 5"),
    "GateProRunConfig tokens and steps": (_config("GateProRunConfig", on_from_tokens=5, off_after_steps=9), ValueError,
                                          "give the GatePro schedule in tokens or in steps, not both"),
    "GateProRunConfig.active_at(str)": (lambda: _run_config(enabled=True)().active_at("10"), TypeError,
                                        "trained (tokens) must be an int; got '10' (str)"),
    "GateProRunConfig.router_config(-1)": (lambda: _run_config(enabled=True)().router_config(-1), ValueError,
                                           "trained (tokens) must be an int >= 0; got -1"),
    "attach(trainer, GateProConfig())": (lambda: _attach(_config()())(), TypeError,
                                         "GateProTrainerCallback.attach: gatepro must be a GateProRunConfig; got "
                                         "GateProConfig("),
    "attach(str, run config)": (lambda: _attach(_run_config()(), trainer="trainer.pt")(), TypeError,
                                "GateProTrainerCallback.attach: trainer must be a transformers.Trainer"),
    "GateProCallback(gatepro=dict)": (_olmo_core_callback(gatepro={"enabled": True}), TypeError,
                                      "GateProCallback.gatepro must be a GateProRunConfig; got {'enabled': True}"),
    "GateProCallback metrics_interval_steps=0": (lambda: _olmo_core_callback(gatepro=_run_config()(), metrics_interval_steps=0)(),
                                           ValueError, "GateProCallback.metrics_interval_steps must be an int >= 1; got 0"),
    "GateProCallback metrics_interval=5 (the old name)": (
        lambda: _olmo_core_callback(gatepro=_run_config()(), metrics_interval=5)(), TypeError,
        "GateProCallback: metrics_interval is now metrics_interval_steps (the name OLMo-core's run configs use)"),
    "attach(..., metrics_interval=5) (the old name)": (
        lambda: _attach(_run_config()(), metrics_interval=5)(), TypeError,
        "GateProTrainerCallback.attach: metrics_interval is now metrics_interval_steps"),
    "attach(..., metrics_every=5)": (lambda: _attach(_run_config()(), metrics_every=5)(), TypeError,
                                     "GateProTrainerCallback.attach got an unexpected keyword argument 'metrics_every'"),
    "GateProCallback metrics_file=path": (lambda: _olmo_core_callback(gatepro=_run_config()(),
                                                                      metrics_file="a/b.jsonl")(),
                                          ValueError, "GateProCallback.metrics_file must be a file name"),
}


def _partners(values):
    import torch

    return torch.tensor(values)


def _patched_tiny_olmoe():
    from olmoe_gatepro import patch_transformers

    model = _tiny_olmoe()
    patch_transformers(model=model, partner_refresh_steps=2)
    return model


@pytest.fixture
def unpatched():
    import olmoe_gatepro

    olmoe_gatepro.unpatch()
    yield
    olmoe_gatepro.unpatch()


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_python_api_names_the_argument(case, unpatched):
    call, error, message = API_CASES[case]
    with pytest.raises(error) as raised:
        call()
    assert type(raised.value) is error  # TypeError for types, ValueError for values: not a subclass of either
    assert str(raised.value).startswith(message), str(raised.value)


def test_families_given_as_one_name_is_that_family(unpatched):
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

    from olmoe_gatepro import patch_transformers

    patch_transformers(families="olmoe", penalty=0.25)
    assert OlmoeTopKRouter._gatepro.penalty == 0.25 and "_gatepro" not in MixtralTopKRouter.__dict__


def test_api_checks_add_no_graph_break_with_a_partner_table(unpatched):
    """The routers' hot path with cached partners (no value check there) compiles whole."""
    import torch

    from olmoe_gatepro.transformers.patch import olmoe_routers

    model = _patched_tiny_olmoe()
    router = olmoe_routers(model)[0]
    hidden = torch.randn(12, 16)
    assert torch._dynamo.explain(router)(hidden).graph_break_count == 0


# ---------------------------------------------------------------------------------------------
# Environment variables.

@pytest.mark.parametrize("variable, value, message", [
    ("OLMOE_GATEPRO_PENALTY", "nan", "environment variable OLMOE_GATEPRO_PENALTY='nan': penalty must be finite and >= 0"),
    ("OLMOE_GATEPRO_PENALTY", "-inf", "environment variable OLMOE_GATEPRO_PENALTY='-inf': penalty must be finite"),
    ("OLMOE_GATEPRO_PENALTY", "1e-4x", "environment variable OLMOE_GATEPRO_PENALTY='1e-4x' is not a valid float"),
    ("OLMOE_GATEPRO_NUM_COMPETITORS", "0", "environment variable OLMOE_GATEPRO_NUM_COMPETITORS='0': num_competitors must"),
    ("OLMOE_GATEPRO_NUM_COMPETITORS", "1.5", "OLMOE_GATEPRO_NUM_COMPETITORS='1.5' is not a valid int"),
    ("OLMOE_GATEPRO_HARD", "maybe", "environment variable OLMOE_GATEPRO_HARD='maybe': expected one of"),
])
def test_bad_environment_values_name_the_variable(workdir, capsys, monkeypatch, variable, value, message):
    monkeypatch.setenv("OLMOE_GATEPRO", "1")
    monkeypatch.setenv(variable, value)
    _refused(["compare", "a", "b"], capsys, message)


def _known() -> str:
    from olmoe_gatepro.env_activation import KNOWN_VARIABLES

    return f"(known: {', '.join(KNOWN_VARIABLES)})"


KNOWN = _known()


@pytest.mark.parametrize("variable, suggestion", [
    ("OLMOE_GATEPRO_PENALTI", "; did you mean OLMOE_GATEPRO_PENALTY?"),
    ("OLMOE_GATEPRO_NUM_COMPETITOR", "; did you mean OLMOE_GATEPRO_NUM_COMPETITORS?"),
    ("OLMOE_GATEPRO_ENABLED", ""),
])
def test_a_misspelt_variable_is_warned_about_once(monkeypatch, variable, suggestion):
    from olmoe_gatepro import env_activation

    monkeypatch.setattr(env_activation, "_warned", set())
    environ = {"OLMOE_GATEPRO": "1", variable: "0.5"}
    with pytest.warns(UserWarning) as warned:
        assert env_activation.config_from_env(environ).penalty == 1e-4  # ignored, not guessed
        env_activation.config_from_env(environ)  # every router import reads it again: still one warning
    assert [str(warning.message) for warning in warned] == [
        f"environment variable {variable} is not one olmoe-gatepro reads{suggestion} {KNOWN}; it is ignored"]


def test_a_misspelt_variable_is_warned_about_in_an_unmodified_script():
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("OLMOE_GATEPRO")},
           "OLMOE_GATEPRO": "1", "OLMOE_GATEPRO_PENALTI": "1e-3"}
    code = "import olmo_core.nn.moe.router, transformers.models.olmoe.modeling_olmoe"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("OLMOE_GATEPRO_PENALTI is not one olmoe-gatepro reads; did you mean "
                               "OLMOE_GATEPRO_PENALTY?") == 1, result.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Run config files (YAML) and their overrides: a ConfigError naming the file and the key or line.

YAML_CASES = {  # id: (file bytes, overrides, texts the error line holds)
    "integer key beside an unknown key": (b"name: x\n1: 2\nfoo: 3\n", [],
                                          ["child.yaml: top level: the key 1 is not a name; known keys here: name,"]),
    "integer key in a section": (b"name: x\nmodel:\n  1: 2\n", [],
                                 ["child.yaml: model: the key 1 is not a name; known keys here: d_model,"]),
    "not UTF-8": (b"name: x\nmodel:\n  block: \xff\xfe\n", [],
                  ["child.yaml, line 3: not UTF-8 text (byte 0xff); save the config as UTF-8"]),
    "null section plus an override of it": (b"name: x\noptim: null\n", ["--optim.lr=1e-3"],
                                            ["child.yaml: override --optim.lr=1e-3: optim is null in the config, "
                                             "not a mapping"]),
    "list section plus an override of it": (b"name: x\nmodel: [1, 2]\n", ["--model.d_model=8"],
                                            ["child.yaml: override --model.d_model=8: model is [1, 2] in the config"]),
    "a key given twice": (b"name: x\nmodel: {d_model: 8}\nname: y\n", [],
                          ["child.yaml, line 3: not valid YAML (the key 'name' is given twice in one mapping)"]),
    "a key given twice in an override": (b"name: x\n", ["--model={d_model: 8, d_model: 16}"],
                                         ["override --model={d_model: 8, d_model: 16}: the value is not valid YAML "
                                          "(the key 'd_model' is given twice"]),
    "a tab": (b"name: x\n\tmodel: {}\n", [], ["child.yaml, line 2: not valid YAML (found character '\\t'"]),
    "a Python tag": (b"name: !!python/object/apply:os.system [echo]\n", [],
                     ["child.yaml, line 1: not valid YAML (could not determine a constructor"]),
    "an unhashable key": (b"name: x\n? [a, b]\n: 1\n", [], ["child.yaml, line 2: not valid YAML (found unhashable key)"]),
    "an empty file": (b"", [], ["child.yaml: expected a mapping at the top level, got None"]),
    "a seed beyond 64 bits": (b"name: x\n", ["--train.seed=99999999999999999999999"],
                              ["train.seed: 99999999999999999999999 does not fit a 64-bit integer"]),
    "a sequence length beyond 64 bits": (b"name: x\ntrain: {sequence_length: 99999999999999999999999}\n", [],
                                         ["child.yaml: train.sequence_length: 99999999999999999999999 does not fit"]),
    "an override of a key inside a value": (b"name: x\n", ["--optim.betas.0=0.5"],
                                            ["unrecognized argument '--optim.betas.0=0.5'"]),
    "an override of a key inside a value, in code": (b"name: x\n", ["--optim.betas.first=0.5"],
                                                      ["child.yaml: override --optim.betas.first: 'betas' is not a "
                                                       "section"]),
    "an override without a key": (b"name: x\n", ["--=5"], ["--=5"]),
}


@pytest.mark.parametrize("case", sorted(YAML_CASES))
def test_train_config_edge_cases(workdir, capsys, case):
    text, overrides, expected = YAML_CASES[case]
    (workdir / "child.yaml").write_bytes(text)
    before = _snapshot(workdir)
    _refused(["train", str(workdir / "child.yaml"), *overrides, "--dry-run"], capsys, *expected)
    assert _snapshot(workdir) == before


def test_a_not_utf8_inherited_file_is_named(workdir, capsys):
    (workdir / "base.yaml").write_bytes(b"name: base\n# caf\xe9\n")
    _write_config(workdir, "child.yaml", "inherit: base.yaml\nname: x\n")
    _refused(["train", str(workdir / "child.yaml"), "--dry-run"], capsys, "base.yaml, line 2: not UTF-8 text (byte 0xe9)")


# ---------------------------------------------------------------------------------------------
# Files the project reads: text that is not UTF-8, or lines that are not JSON, named by file and line.

def _result_folder(folder, samples: bytes | None = None, result: bytes | None = None, label: str = "a"):
    """A run folder with a one-task result (and its per-item file) that load_result accepts."""
    from olmoe_gatepro.evaluation.results import SCHEMA, write_evaluation

    record = {"schema": SCHEMA, "label": label, "suite": "lm-eval",
              "tasks": {"copa": {"score": 0.5, "stderr": None, "samples": 2, "metric": "acc"}}}
    path = write_evaluation(str(folder), "lm-eval", record, [{"task": "copa", "item": "0", "correct": True},
                                                              {"task": "copa", "item": "1", "correct": False}])
    samples_file = os.path.join(str(folder), sorted(set(os.listdir(folder)) - {os.path.basename(path)})[0])
    if samples is not None:
        with open(samples_file, "wb") as file:
            file.write(samples)
    if result is not None:
        with open(path, "wb") as file:
            file.write(result)
    return path, samples_file


def _read_records(path):
    from olmoe_gatepro.jsonl import read_records

    return read_records(path)


def _load_samples(folder):
    from olmoe_gatepro.evaluation.results import load_result, load_samples

    return load_samples(load_result(str(folder)))


def _documents(path):
    from olmoe_gatepro.data import iter_documents

    return list(iter_documents(path))


READER_CASES = {  # id: (file name, bytes, reader, message (after the path))
    "records not UTF-8": ("m.jsonl", b'{"step": 1}\n{"step": "\xff"}\n', _read_records,
                          ", line 2: not UTF-8 text (byte 0xff cannot be decoded)"),
    "records garbled line": ("m.jsonl", b'{"step": 1}\n{"step": 2,,}\n{"step": 3}\n', _read_records,
                             ", line 2: not a JSON record (Expecting property name enclosed in double quotes, column 12)"),
    "records not objects": ("m.jsonl", b'[1, 2]\n', _read_records, ", line 1: expected a JSON object, got list"),
    "text not UTF-8": ("doc.txt", b"caf\xc3\xa9\nna\xefve\n", _documents, ", line 2: not UTF-8 text (byte 0xef"),
    "jsonl documents not UTF-8": ("d.jsonl", b'{"text": "a"}\n{"text": "\xe9"}\n', _documents,
                                  ", line 2: not UTF-8 text (byte 0xe9"),
    "jsonl documents garbled": ("d.jsonl", b'{"text": "a"}\n{"text": \n', _documents,
                                ", line 2: expected a JSON object with a 'text' key"),
    "jsonl document text not a string": ("d.jsonl", b'{"text": 5}\n', _documents,
                                         ", line 1: 'text' must be a string; got int"),
    "gzip cut short": ("d.jsonl.gz", None, _documents, ": not a complete gzip file"),
    "gzip that is not gzip": ("d.jsonl.gz", b"plain text, not gzip\n", _documents, ": not a complete gzip file"),
}


@pytest.mark.parametrize("case", sorted(READER_CASES))
def test_file_readers_name_the_file_and_line(tmp_path, case):
    import gzip

    name, content, read, message = READER_CASES[case]
    path = tmp_path / name
    path.write_bytes(content if content is not None else gzip.compress(b'{"text": "a"}\n' * 50)[:30])
    with pytest.raises(ValueError) as raised:
        read(str(path))
    assert str(raised.value).startswith(str(path) + message), str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("samples, message", [
    (b'{"task": "copa", "item": "0", "correct": true}\n{"task": "copa", "item": "\xff", "correct": false}\n',
     ", line 2: not UTF-8 text (byte 0xff"),
    (b'{"task": "copa", "item": "0", "correct": true}\n{"task": "copa"\n', ', line 2: expected {"task", "item", "correct"}'),
])
def test_per_item_files_name_the_file_and_line(tmp_path, samples, message):
    _, samples_file = _result_folder(tmp_path, samples=samples)
    with pytest.raises(ValueError) as raised:
        _load_samples(tmp_path)
    assert str(raised.value).startswith(samples_file + message), str(raised.value)


@pytest.mark.parametrize("result, message", [
    (b'{"schema": "caf\xe9"}', ", line 1: not UTF-8 text (byte 0xe9"),
    (b'{\n  "schema": 1,\n  "label" "a"\n}', ", line 3, column 11: not valid JSON (Expecting ':' delimiter)"),
])
def test_compare_names_a_result_file_that_is_not_utf8_or_json(workdir, capsys, result, message):
    path, _ = _result_folder(workdir / "run", result=result)
    _refused(["compare", str(workdir / "run"), str(workdir / "run"), "--out", "out"], capsys, path + message)
    assert not os.path.exists("out")


def test_a_resumed_metrics_file_with_a_garbled_line_is_named_and_kept(tmp_path):
    from olmoe_gatepro.jsonl import drop_after_step

    path = tmp_path / "gatepro_metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n{"no step": 2}\n')
    with pytest.raises(ValueError, match=r"gatepro_metrics.jsonl, line 2: expected a record with an integer 'step'"):
        drop_after_step(str(path), 1)
    assert path.read_bytes() == b'{"step": 1}\n{"no step": 2}\n'


def test_rerun_with_other_settings_names_the_differing_keys(tmp_path):
    from olmoe_gatepro.jsonl import keep_settings, write_text_atomically

    path = tmp_path / "preset.json"
    write_text_atomically(str(path), json.dumps({"grid": {"penalty": [1e-4, 1e-3], "steps": 40}, "seeds": [0, 1]}))
    keep_settings(str(path), {"grid": {"penalty": (1e-4, 1e-3), "steps": 40}, "seeds": [0, 1]}, "--out")
    with pytest.raises(ValueError) as raised:
        keep_settings(str(path), {"grid": {"penalty": [1e-4], "steps": 40}, "seeds": [0, 1], "new": 1}, "--out")
    assert str(raised.value) == (
        f"--out {tmp_path} holds a run with other settings ({path}): grid.penalty: [0.0001, 0.001] there, [0.0001] "
        "now; new: absent there, 1 now; rerun with the recorded settings, or use another --out")
    path.write_bytes(b'{"grid": \xff}')
    with pytest.raises(ValueError, match=r"preset.json, line 1: not UTF-8 text .*; remove it, or use another --out"):
        keep_settings(str(path), {}, "--out")


# ---------------------------------------------------------------------------------------------
# Damaged model files: one line naming the file.

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, checkpoint):
    """A copy of the tiny Hugging Face checkpoint to damage."""
    import shutil

    def copy(name):
        folder = tmp_path_factory.mktemp("damaged") / name
        shutil.copytree(checkpoint, folder)
        return folder

    return copy


def _damage(folder, how):
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    if how == "cut in half":
        os.truncate(weights, size // 2)
    elif how == "cut to 5 bytes":
        os.truncate(weights, 5)
    elif how == "random bytes":
        weights.write_bytes(os.urandom(size))
    elif how == "config not JSON":
        (folder / "config.json").write_text("{not json")
    return weights if how != "config not JSON" else folder / "config.json"


DAMAGE = {
    "cut in half": "model.safetensors is cut short: ",
    "cut to 5 bytes": "model.safetensors: not a complete safetensors file (5 bytes",
    "random bytes": "model.safetensors: not a complete safetensors file",
    "config not JSON": "config.json, line 1, column 2: not valid JSON",
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_inspect_names_a_damaged_model_file(workdir, capsys, hf_folder, how):
    folder = hf_folder(how.replace(" ", "-"))
    damaged = _damage(folder, how)
    _refused(["inspect", str(folder), "--text", "a-file", "--max-tokens", "8", "--out", "out"], capsys,
             f"{os.path.dirname(damaged)}/{DAMAGE[how]}")
    assert not os.path.exists("out")


@pytest.mark.parametrize("how", ["cut in half", "random bytes"])
def test_the_library_loaders_name_a_cut_short_weight_file(hf_folder, how):
    """eval (both suites) and continue check the weights before loading them."""
    from olmoe_gatepro.evaluation.lm_eval_suite import evaluate
    from olmoe_gatepro.evaluation.olmo_in_loop_suite import evaluate_in_loop

    folder = hf_folder("loaders-" + how.replace(" ", "-"))
    damaged = _damage(folder, how)
    for load in (lambda: evaluate(str(folder), label="a", tasks=("copa",), limit=1),
                 lambda: evaluate_in_loop(str(folder), label="a", tasks=("copa",), limit=1)):
        with pytest.raises(ValueError, match=re.escape(f"{damaged}{DAMAGE[how].removeprefix('model.safetensors')}")):
            load()


@pytest.fixture(scope="module")
def olmo_core_checkpoint(tmp_path_factory):
    """A save folder with one tiny OLMo-core checkpoint (step3), as training leaves it, and its run config."""
    from olmoe_gatepro.olmo_core.cpu import enable_cpu_moe

    enable_cpu_moe()
    from olmo_core.distributed.checkpoint import save_model_and_optim_state

    from olmoe_gatepro.olmo_core.run_config import load_run_config
    from olmoe_gatepro.olmo_core.train import build_transformer_config

    folder = tmp_path_factory.mktemp("olmo-core") / "run"
    run = load_run_config(TINY_CONFIG, ["--model.d_model=16", "--model.n_layers=1", "--model.n_heads=2",
                                        "--model.num_experts=4", "--model.top_k=2", "--model.expert_hidden_size=8"])
    model = build_transformer_config(run.model).build(init_device="cpu").eval()
    save_model_and_optim_state(str(folder / "step3" / "model_and_optim"), model)
    return str(folder), run


def _damaged_checkpoint(tmp_path, olmo_core_checkpoint, how):
    import shutil

    source, run = olmo_core_checkpoint
    folder = tmp_path / "run"
    shutil.copytree(source, folder)
    data = folder / "step3" / "model_and_optim"
    shards = sorted(name for name in os.listdir(data) if name.endswith(".distcp"))
    if how == "index cut short":
        os.truncate(data / ".metadata", 100)
        return data / ".metadata"
    shard = data / shards[-1]
    if how == "shard cut short":
        os.truncate(shard, 10)
    elif how == "shard missing":
        shard.unlink()
    elif how == "shard overwritten":
        shard.write_bytes(os.urandom(shard.stat().st_size))
    return shard


CHECKPOINT_DAMAGE = {
    "index cut short": ": not a readable checkpoint index (pickle data was truncated)",
    "shard cut short": " is cut short: 10 bytes where its .metadata needs ",
    "shard missing": " is missing (its .metadata lists it)",
    "shard overwritten": " is damaged: a tensor in it does not load (",
}


@pytest.mark.parametrize("how", sorted(CHECKPOINT_DAMAGE))
def test_convert_names_the_damaged_checkpoint_file(workdir, capsys, olmo_core_checkpoint, how):
    import dataclasses

    damaged = _damaged_checkpoint(workdir, olmo_core_checkpoint, how)
    config = workdir / "run.yaml"
    config.write_text(json.dumps(dataclasses.asdict(olmo_core_checkpoint[1])))  # JSON is YAML
    _refused(["convert", str(workdir / "run" / "step3"), "--out", "hf", "--config", str(config)], capsys,
             f"checkpoint file {damaged}{CHECKPOINT_DAMAGE[how]}")
    assert not os.path.exists("hf") and not os.path.exists("hf.partial")


def test_convert_with_the_wrong_config_says_so(workdir, capsys, olmo_core_checkpoint):
    source, _ = olmo_core_checkpoint
    _refused(["convert", f"{source}/step3", "--out", "hf", "--config", TINY_CONFIG], capsys,
             f"checkpoint {source}/step3/model_and_optim does not load into the model of the run config (Size mismatch")
    assert not os.path.exists("hf") and not os.path.exists("hf.partial")


# ---------------------------------------------------------------------------------------------
# A full disk: the error names the path and says the disk is full; nothing half-written is left
# and nothing already written is lost. A small tmpfs is the full disk (skipped where it cannot be mounted).

@contextlib.contextmanager
def _tmpfs(mount, options: str):
    """A 64 KiB tmpfs mounted on ``mount`` with ``options`` for the block; the test is skipped where it cannot be."""
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options}size=64k", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB disk, mounted for the test."""
    with _tmpfs(tmp_path / "small-disk", "") as mount:
        yield mount


def _fill(folder):
    """Fill the disk of ``folder`` up."""
    with open(folder / "filler", "wb", buffering=0) as file:
        with contextlib.suppress(OSError):
            while True:
                file.write(b"x" * 4096)


def _leftovers(folder):
    return sorted(name for name in os.listdir(folder) if "partial" in name)


def test_a_full_disk_keeps_the_previous_file_whole(small_disk):
    from olmoe_gatepro.jsonl import FileWriteError, write_text_atomically

    path = small_disk / "table.md"
    write_text_atomically(str(path), "the earlier table\n")
    with pytest.raises(FileWriteError) as raised:
        write_text_atomically(str(path), "x" * 200_000)
    assert str(raised.value) == f"{path}: cannot write: the disk is full; nothing half-written was left"
    assert path.read_text() == "the earlier table\n" and _leftovers(small_disk) == []


def test_a_full_disk_cuts_a_failed_append_back(small_disk):
    from olmoe_gatepro.jsonl import FileWriteError, append_record, read_records

    path = small_disk / "gatepro_metrics.jsonl"
    append_record(str(path), {"step": 1})
    before = path.read_bytes()
    _fill(small_disk)
    with pytest.raises(FileWriteError, match="gatepro_metrics.jsonl: cannot write: the disk is full"):
        append_record(str(path), {"step": 2, "layers": ["x" * 100] * 200})  # 20 kB: part of it fits the last page
    assert path.read_bytes() == before and read_records(str(path)) == [{"step": 1}]


def test_a_full_disk_during_a_plot_leaves_no_partial_png(small_disk):
    import matplotlib.pyplot as plt

    from olmoe_gatepro.evaluation.plots import save_figure
    from olmoe_gatepro.jsonl import FileWriteError

    _fill(small_disk)
    figure = plt.figure()
    figure.gca().plot(range(1000))
    with pytest.raises(FileWriteError, match="curves.png: cannot write: the disk is full"):
        save_figure(figure, str(small_disk / "curves.png"))
    assert _leftovers(small_disk) == [] and not (small_disk / "curves.png").exists()


def test_prepare_data_on_a_full_disk_keeps_the_units_written_and_leaves_no_partial(small_disk, tmp_path, capsys):
    from olmoe_gatepro.data import MANIFEST_FILE

    # 3 files (units) of 4 documents of 4 000 tokens: 8 kB shards, 32 kB a unit; two units do not fit. Which unit
    # hits the full disk depends on the two workers' timing: the ones completed before it stay whole and named
    texts = [tmp_path / f"text{index}.jsonl" for index in range(3)]
    for text in texts:
        text.write_text("".join(json.dumps({"text": "x" * 3_999}) + "\n" for _ in range(4)))
    out = small_disk / "tokens"
    _refused(["prepare-data", *map(str, texts), "--out", str(out), "--tokens-per-file", "4000"], capsys,
             f"{out}/", ": cannot write: the disk is full; nothing half-written was left")
    shards = sorted(name for name in os.listdir(out) if name != MANIFEST_FILE)
    done = json.loads((out / MANIFEST_FILE).read_text())["done"] if (out / MANIFEST_FILE).exists() else []
    assert len(done) <= 1 and shards == [f"part-{index:05d}.npy" for index in range(4 * len(done))]  # whole units
    assert all(os.path.getsize(out / name) == 8_000 for name in shards)  # each shard whole
    assert _leftovers(out) == []


# ---------------------------------------------------------------------------------------------
# The command line, round two: devices, output places, reruns, sizes.

def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


DEVICE_CASES = [
    (["eval", "MODEL", "--label", "a", "--device", "foo", "--out", "o"], "--device 'foo': expected cpu, cuda or cuda:N"),
    (["inspect", "MODEL", "--device", "foo", "--out", "o"], "--device 'foo': expected cpu, cuda or cuda:N"),
    (["selftest", "--device", "foo"], "--device 'foo': expected cpu, cuda or cuda:N"),
    (["selftest", "--device", "cpu:3"], "--device 'cpu:3': the CPU has no index other than 0"),
    (["smoke", "--device", "foo"], "--device: device must be cpu or cuda[:N]; got 'foo'"),
    (["eval", "MODEL", "--label", "a", "--device", "cuda:64", "--out", "o"], "--device cuda:64: "),
    (["inspect", "MODEL", "--device", "cuda:64", "--out", "o"], "--device cuda:64: "),
    (["selftest", "--device", "cuda:64"], "--device cuda:64: "),
    (["smoke", "--device", "cuda:64"], "--device cuda:64: "),
]


@pytest.mark.parametrize("argv, message", DEVICE_CASES, ids=lambda value: " ".join(value) if isinstance(value, list)
                         else None)
def test_every_command_checks_the_device_against_this_machine(workdir, capsys, checkpoint, argv, message):
    argv = [checkpoint if item == "MODEL" else item for item in argv]
    line = _refused(argv, capsys, message)
    if "cuda:64" in message:  # a GPU this machine does not have: none here, or not that many
        assert ("no CUDA GPU is visible on this machine" in line) != _has_gpu(), line
    assert sorted(os.listdir(workdir)) == ["a-file"]


@pytest.mark.skipif(_has_gpu(), reason="this machine has a GPU: cuda is a device it has")
@pytest.mark.parametrize("argv", [["smoke", "--device", "cuda"], ["selftest", "--device", "cuda"],
                                  ["eval", "MODEL", "--label", "a", "--device", "cuda", "--out", "o"]])
def test_cuda_without_a_gpu_is_refused_not_run_on_the_cpu(workdir, capsys, checkpoint, argv):
    _refused([checkpoint if item == "MODEL" else item for item in argv], capsys,
             "--device cuda: no CUDA GPU is visible on this machine (use cpu)")
    assert sorted(os.listdir(workdir)) == ["a-file"]


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder on a read-only file system (even root cannot write there)."""
    with _tmpfs(tmp_path / "read-only", "ro,") as mount:
        yield mount


def test_outputs_into_a_file_or_a_read_only_folder_are_refused_first(workdir, capsys, read_only_folder):
    result, _ = _result_folder(workdir / "run")
    _refused(["compare", result, result, "--out", "a-file"], capsys, "--out a-file: exists and is not a folder")
    _refused(["compare", result, result, "--out", str(read_only_folder)], capsys,
             f"--out {read_only_folder}: not writable")
    _refused(["compare", result, result, "--out", str(read_only_folder / "new")], capsys,
             f"--out {read_only_folder}/new: cannot be created ({read_only_folder} is not a writable folder)")
    _refused(["selftest", "--json", str(read_only_folder / "report.json")], capsys,
             f"--json {read_only_folder}/report.json: {read_only_folder} is not writable")
    _refused(["selftest", "--json", "a-file/report.json"], capsys, "--json a-file/report.json: not a file path")
    _refused(["train", TINY_CONFIG, f"--train.save_folder={read_only_folder}/run", "--dry-run"], capsys,
             f"tiny.yaml: train.save_folder {read_only_folder}/run: cannot be created")
    _refused(["train", TINY_CONFIG, "--train.save_folder=a-file/run", "--dry-run"], capsys,
             "train.save_folder a-file/run: cannot be created")
    assert sorted(os.listdir(workdir)) == ["a-file", "read-only", "run"] and os.listdir(read_only_folder) == []


def test_a_write_refused_by_the_disk_is_one_line(workdir, capsys, read_only_folder, monkeypatch):
    """What the early checks cannot see (a folder that turns read-only) still ends in one line, exit 2."""
    import olmoe_gatepro.cli.common as common

    monkeypatch.setattr(common.os, "access", lambda path, mode: True)  # the early check is fooled
    first, _ = _result_folder(workdir / "run", label="a")
    second, _ = _result_folder(workdir / "run2", label="b")
    _refused(["compare", first, second, "--out", str(read_only_folder)], capsys,
             f"{read_only_folder}/", ": cannot write: the file system is read-only; nothing half-written was left")


def test_a_second_eval_into_the_same_out_is_refused_while_the_first_runs(workdir, capsys, checkpoint):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom olmoe_gatepro.jsonl import folder_lock\n"
         "with folder_lock(sys.argv[1], 'eval'):\n    print('held', flush=True)\n    time.sleep(60)", "run"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        _refused(["eval", checkpoint, "--label", "b", "--tasks", "copa", "--limit", "1", "--out", "run"], capsys,
                 "another eval run holds --out run (lock run/.eval.lock); wait for it to end, or use another --out")
    finally:
        holder.kill()
        holder.wait()
    assert os.listdir("run") == [".eval.lock"]  # nothing of the refused run


def test_study_rerun_with_other_settings_names_the_keys(workdir, capsys):
    import dataclasses

    from olmoe_gatepro.pipelines.presets import STUDY_PRESETS

    preset = STUDY_PRESETS["minimal"]
    recorded = {"run": {**dataclasses.asdict(preset.run), "num_experts": 4},
                "settings": [{"name": s.name, "gatepro": dataclasses.asdict(s.gatepro)} for s in preset.settings],
                "seeds": [0, 1], "lb_loss_weights": list(preset.lb_loss_weights)}
    (workdir / "study").mkdir()
    (workdir / "study" / "preset.json").write_text(json.dumps(recorded))
    before = _snapshot(workdir / "study")
    _refused(["study", "--preset", "minimal", "--out", "study"], capsys,
             "--out study holds a run with other settings (study/preset.json): run.num_experts: 4 there, 8 now; "
             "seeds: [0, 1] there, [0] now; rerun with the recorded settings, or use another --out")
    assert _snapshot(workdir / "study") == before


SMOKE_SIZE_CASES = [
    (["--metrics-interval-steps", "50", "--steps", "2"],
     "--metrics-interval-steps: metrics_interval_steps (50) must be <= steps (2): no step would be recorded"),
    (["--seed", "99999999999999999999"], "--seed: seed must lie in [0, 2^32) (numpy's seed range)"),
    (["--seed", "4294967296"], "--seed: seed must lie in [0, 2^32)"),
    (["--sequence-length", "100000000", "--steps", "1", "--metrics-interval-steps", "1"],
     "--sequence-length: sequence_length (100000000) must be shorter than the corpus part it is drawn from"),
]


@pytest.mark.parametrize("flags, message", SMOKE_SIZE_CASES)
def test_smoke_sizes(workdir, capsys, flags, message):
    _refused(["smoke", *flags], capsys, message)
    assert sorted(os.listdir(workdir)) == ["a-file"]


@pytest.mark.parametrize("error, message", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 102400000000 bytes. Error code 12 (Cannot allocate memory)"),
     "out of memory: the run tried to allocate 102.4 GB at once; choose smaller sizes"),
    (MemoryError(), "out of memory; choose smaller sizes"),
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors' way
     "cannot write the output: the disk is full (Exception)"),
    (RuntimeError("shape mismatch"), None),
])
def test_an_allocation_too_large_or_a_full_disk_is_one_line(monkeypatch, capsys, error, message):
    import olmoe_gatepro.cli.tiny as tiny

    def allocate(*args, **kwargs):
        raise error

    monkeypatch.setattr("olmoe_gatepro.pipelines.tiny_run.compare_tiny", allocate)
    monkeypatch.setattr(tiny, "check_out_folder", lambda *args: None)
    if message is None:  # not an allocation: a bug, shown as one
        with pytest.raises(RuntimeError, match="shape mismatch"):
            main(["smoke"])
    else:
        _refused(["smoke"], capsys, message)


def test_prepare_data_checks_the_tokenizer_and_ids_before_making_the_folder(workdir, capsys):
    (workdir / "text.txt").write_text("hello")
    _refused(["prepare-data", "text.txt", "--out", "tokens", "--tokenizer", "text.txt"], capsys,
             "tokenizer text.txt: not a tokenizer.json file (")
    _refused(["prepare-data", "text.txt", "--out", "tokens", "--eos-token-id", "70000"], capsys,
             "eos_token_id 70000 does not fit dtype uint16 (0 to 65535); use uint32")
    _refused(["prepare-data", "text.txt", "--out", "a-file/tokens"], capsys,
             "a-file/tokens: cannot write: Not a directory")
    assert sorted(os.listdir(workdir)) == ["a-file", "text.txt"]


def test_a_misspelt_variable_is_one_warning_line_on_the_command_line(workdir, capsys, monkeypatch):
    from olmoe_gatepro import env_activation

    monkeypatch.setattr(env_activation, "_warned", set())
    monkeypatch.setenv("OLMOE_GATEPRO_PENALTI", "1e-3")
    with pytest.raises(SystemExit):
        main(["compare", "only-one"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [f"olmoe-gatepro compare: warning: environment variable OLMOE_GATEPRO_PENALTI is not one "
                        f"olmoe-gatepro reads; did you mean OLMOE_GATEPRO_PENALTY? {KNOWN}; it is ignored"]


@pytest.mark.parametrize("argv, env, message", [
    (["eval", "nowhere/model", "--label", "a", "--device", "foo", "--out", "o"], {},
     "olmoe-gatepro eval: error: --device 'foo': expected cpu, cuda or cuda:N"),
    (["train", "bad.yaml", "--dry-run"], {}, "bad.yaml, line 2: not UTF-8 text (byte 0xff); save the config as UTF-8"),
    (["compare", "a", "b"], {"OLMOE_GATEPRO": "1", "OLMOE_GATEPRO_PENALTY": "nan"},
     "environment variable OLMOE_GATEPRO_PENALTY='nan': penalty must be finite and >= 0; got nan"),
])
def test_in_a_real_process_bad_input_is_exit_2_and_one_line(workdir, argv, env, message):
    (workdir / "bad.yaml").write_bytes(b"name: x\n\xff: 1\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OLMOE_GATEPRO")}
    result = subprocess.run([sys.executable, "-m", "olmoe_gatepro.cli", *argv], capture_output=True, text=True,
                            env={**clean, **env})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert sorted(os.listdir(workdir)) == ["a-file", "bad.yaml"]


def test_compare_on_a_full_disk_keeps_the_earlier_report(workdir, capsys, small_disk):
    first, _ = _result_folder(workdir / "run", label="a")
    second, _ = _result_folder(workdir / "run2", label="b")
    out = small_disk / "report"
    out.mkdir()
    (out / "table.md").write_text("the earlier table\n")
    _fill(small_disk)
    _refused(["compare", first, second, "--out", str(out)], capsys, f"{out}/", ": cannot write: the disk is full")
    assert (out / "table.md").read_text() == "the earlier table\n" and _leftovers(out) == []


def test_inspect_on_a_full_disk_leaves_no_partial_file(workdir, capsys, checkpoint, small_disk):
    (workdir / "text.txt").write_text("hello world, " * 20)
    out = small_disk / "routing"
    _fill(small_disk)
    _refused(["inspect", checkpoint, "--text", "text.txt", "--max-tokens", "64", "--out", str(out)], capsys,
             f"{out}", ": cannot write: the disk is full")
    assert not out.exists() or _leftovers(out) == []


@pytest.mark.parametrize("flags, message", [
    (["--warmup-tokens", "-1"], "--warmup-tokens: warmup_tokens must be >= 0; got -1"),
    (["--seed", "99999999999999999999"], "--seed: seed must lie in [0, 2^32); got 99999999999999999999"),
    (["--lr", "inf"], "--lr: lr must be finite and > 0; got inf"),
    (["--lr", "nan"], "--lr: lr must be finite and > 0; got nan"),
    (["--metrics-interval-steps", "0"], "--metrics-interval-steps: metrics_interval_steps must be an int >= 1; got 0"),
    (["--sequence-length", "1"], "--sequence-length: sequence_length must be an int >= 2; got 1"),
])
def test_continue_flags(workdir, capsys, checkpoint, flags, message):
    (workdir / "text.txt").write_text("hello world")
    _refused(["continue", checkpoint, "--data", "text.txt", "--max-tokens", "8", "--baseline", "--out", "run",
              *flags], capsys, message)
    assert sorted(os.listdir(workdir)) == ["a-file", "text.txt"]


@pytest.mark.parametrize("data, message", [
    (b"caf\xe9\n", "text.txt, line 1: not UTF-8 text (byte 0xe9 cannot be decoded)"),
])
def test_continue_names_a_data_file_that_is_not_utf8(workdir, capsys, checkpoint, data, message):
    (workdir / "text.txt").write_bytes(data)
    _refused(["continue", checkpoint, "--data", "text.txt", "--max-tokens", "8", "--sequence-length", "4",
              "--micro-batch-sequences", "1", "--baseline", "--out", "run"], capsys, message)


def test_config_copy_to_a_place_that_cannot_be_written(workdir, capsys, read_only_folder):
    _refused(["config", "show", "olmoe-1b-7b/gatepro", "--copy-to", str(read_only_folder / "mine")], capsys,
             f"--copy-to {read_only_folder}/mine: cannot be created")
    _refused(["config", "show", "olmoe-1b-7b/gatepro", "--copy-to", "a-file"], capsys,
             "--copy-to a-file: exists and is not a folder")


@pytest.mark.parametrize("metrics, message", [
    (b'{"step": 1, "train/CE loss": 5.0}\n{"train/CE loss": 4.0}\n', "metrics.jsonl, line 2: expected a record with an "
                                                                     "integer 'step'"),
    (b'{"step": 1, "train/CE loss": 5.0}\n{"step": 2, "train/CE loss": \xff}\n', "metrics.jsonl, line 2: not UTF-8"),
])
def test_compare_curves_name_a_bad_metrics_line(workdir, capsys, metrics, message):
    import dataclasses

    from olmoe_gatepro.olmo_core.run_config import load_run_config

    run = workdir / "run"
    run.mkdir()
    (run / "run_config.json").write_text(json.dumps(dataclasses.asdict(load_run_config(TINY_CONFIG))))
    (run / "metrics.jsonl").write_bytes(metrics)
    _refused(["compare", "--curves", f"a={run}", "--out", "out"], capsys, f"--curves a={run}: {run}/{message}")
    assert not os.path.exists("out")


def test_convert_on_a_full_disk_leaves_no_partial_folder(workdir, capsys, olmo_core_checkpoint, small_disk):
    import dataclasses

    source, run = olmo_core_checkpoint
    config = workdir / "run.yaml"
    config.write_text(json.dumps(dataclasses.asdict(run)))
    _fill(small_disk)
    _refused(["convert", f"{source}/step3", "--out", str(small_disk / "hf"), "--config", str(config), "--no-validate"],
             capsys, f"{small_disk}/hf", ": cannot write: the disk is full; nothing half-written was left")
    assert sorted(os.listdir(small_disk)) == ["filler"]
