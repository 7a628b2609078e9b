import json

import pytest

from olmoe_gatepro import cli
from olmoe_gatepro.pipelines.tiny_run import LAYER_METRICS


def test_smoke_prints_both_runs_side_by_side_and_writes_json(tmp_path, capsys):
    out = tmp_path / "smoke"
    argv = ["smoke", "--steps", "4", "--log-every", "2", "--num-layers", "2", "--batch-size", "4",
            "--seq-len", "32", "--gatepro-penalty", "0.05", "--out", str(out)]
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
    argv = ["smoke", "--steps", "2", "--log-every", "1", "--batch-size", "2", "--seq-len", "16"]
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
