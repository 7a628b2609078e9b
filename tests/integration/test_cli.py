import json

import pytest

from olmoe_gatepro import cli
from olmoe_gatepro.pipelines.tiny_run import LAYER_METRICS


def test_smoke_prints_both_runs_side_by_side_and_writes_json(tmp_path, capsys):
    out = tmp_path / "smoke"
    argv = ["smoke", "--steps", "4", "--metrics-interval-steps", "2", "--n-layers", "2",
            "--global-batch-sequences", "4", "--sequence-length", "32", "--gatepro-penalty", "0.05", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "baseline" in printed and "gatepro" in printed
    for layer in (0, 1):
        for key in LAYER_METRICS:
            assert f"layer {layer} {key}" in printed
    result = json.loads((out / "tiny_comparison.json").read_text())
    assert result["gatepro"]["penalty"] == 0.05
    baseline, gatepro = result["runs"]["baseline"], result["runs"]["gatepro"]
    assert [r["step"] for r in baseline] == [2, 4] == [r["step"] for r in gatepro]
    assert set(baseline[-1]["layers"][0]) == set(LAYER_METRICS)
    # Same seed, same data: the first logged losses are close but GatePro changed something.
    assert baseline[0]["loss"] != gatepro[0]["loss"]
    assert not list(out.glob("*.partial"))


def test_smoke_is_deterministic_for_a_seed(tmp_path):
    argv = ["smoke", "--steps", "2", "--metrics-interval-steps", "1", "--global-batch-sequences", "2", "--sequence-length", "16"]
    cli.main(argv + ["--out", str(tmp_path / "a")])
    cli.main(argv + ["--out", str(tmp_path / "b")])
    a = json.loads((tmp_path / "a" / "tiny_comparison.json").read_text())
    b = json.loads((tmp_path / "b" / "tiny_comparison.json").read_text())
    assert a["runs"] == b["runs"]


def test_bad_gatepro_flag_names_the_value(capsys):
    with pytest.raises(SystemExit):
        cli.main(["smoke", "--gatepro-penalty", "-1"])
    error = capsys.readouterr().err
    assert "error: --gatepro-penalty: penalty must be finite and >= 0; got -1.0" in error


@pytest.mark.parametrize("command, old, new", [("smoke", "--seq-len", "--sequence-length"),
                                               ("smoke", "--hidden-size", "--d-model"),
                                               ("smoke", "--log-every", "--metrics-interval-steps"),
                                               ("continue", "--learning-rate", "--lr"),
                                               ("continue", "--metrics-interval", "--metrics-interval-steps"),
                                               ("continue", "--train-tokens", "--max-tokens"),
                                               ("continue", "--tokens-dtype", "--token-dtype"),
                                               ("continue", "--warmup-steps", "--warmup-tokens"),
                                               ("inspect", "--tokens-dtype", "--token-dtype"),
                                               ("prepare-data", "--dtype", "--token-dtype"),
                                               ("check-data", "--dtype", "--token-dtype")])
def test_an_old_flag_points_to_its_new_name(capsys, tmp_path, command, old, new):
    argv = {"smoke": [command, old, "3"],
            "continue": [command, "m", "--data", "d", "--max-tokens", "1", "--baseline", "--out", str(tmp_path), old, "3"],
            "inspect": [command, "m", "--out", str(tmp_path), old, "uint16"],
            "prepare-data": [command, "in.txt", "--out", str(tmp_path), old, "uint16"],
            "check-data": [command, "in.npy", "--vocab-size", "256", old, "uint16"]}[command]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and error.endswith(f"error: {old} is now {new} (the name OLMo-core's run configs use)")
