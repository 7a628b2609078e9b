import json
import os

import pytest

from olmoe_gatepro.cli import main


def _run(out):
    assert main(["reproduce", "--preset", "tiny", "--out", str(out)]) == 0


def test_reproduce_end_to_end_is_deterministic(tmp_path, capsys):
    _run(tmp_path / "a")
    assert f"report: {tmp_path / 'a' / 'report'}" in capsys.readouterr().out
    report = tmp_path / "a" / "report"
    for name in ("table.md", "table.csv", "zero_token_count.png", "diversity.png", "settings.json"):
        assert (report / name).stat().st_size > 0, name
    for model in ("baseline", "gatepro"):
        assert (tmp_path / "a" / model / "checkpoint" / "config.json").exists()
        assert (tmp_path / "a" / model / "gatepro_metrics.jsonl").read_text().count("\n") == 2
    result = json.loads((tmp_path / "a" / "gatepro" / "eval_results.json").read_text())
    assert result["gatepro"]["penalty"] == 0.05 and result["limit"] == 1
    assert json.loads((tmp_path / "a" / "baseline" / "eval_results.json").read_text())["gatepro"] is None
    _run(tmp_path / "b")
    assert (tmp_path / "b" / "report" / "table.md").read_text() == report.joinpath("table.md").read_text()


def test_rerun_continues_where_it_stopped(tmp_path):
    out = tmp_path / "run"
    _run(out)
    kept = out / "baseline" / "eval_results.json"
    kept_mtime = os.stat(kept).st_mtime_ns
    checkpoint_mtime = os.stat(out / "gatepro" / "checkpoint" / "config.json").st_mtime_ns
    os.remove(out / "gatepro" / "eval_results.json")  # as if interrupted during the last evaluation
    _run(out)
    assert os.stat(kept).st_mtime_ns == kept_mtime  # finished work is not redone
    assert os.stat(out / "gatepro" / "checkpoint" / "config.json").st_mtime_ns == checkpoint_mtime
    assert (out / "gatepro" / "eval_results.json").exists()


def test_refuses_a_folder_of_another_preset(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "settings.json").write_text(json.dumps({"preset": "smoke"}))
    with pytest.raises(SystemExit):
        main(["reproduce", "--preset", "tiny", "--out", str(out)])
    assert "holds a run with other settings" in capsys.readouterr().err
