"""``olmoe-gatepro inspect``: routing metrics against plain-loop references, inputs, outputs, bad input."""

import csv
import json
import os

import numpy as np
import pytest
import torch

from olmoe_gatepro.cli import main
from olmoe_gatepro.core.reference import (
    reference_gatepro,
    reference_margin_fraction,
    reference_partner_coactivation,
    reference_partners,
)
from olmoe_gatepro.evaluation.inspect_routing import ModelToInspect, TextSource, inspect_models, to_markdown
from olmoe_gatepro.pipelines.presets import TinyRunConfig
from olmoe_gatepro.pipelines.tiny_run import build_tiny_olmoe, save_checkpoint
from olmoe_gatepro.transformers.patch import olmoe_routers
from test_bad_inputs import _refused, _snapshot

EXPERTS, TOP_K, HIDDEN = 6, 2, 32
# Router rows built in pairs pointing almost the same way: partners 0<->1, 2<->3, 4<->5.
PAIRS = [1, 0, 3, 2, 5, 4]


def _hand_built(seed: int) -> torch.nn.Module:
    model = build_tiny_olmoe(TinyRunConfig(seed=seed, n_layers=2, num_experts=EXPERTS, top_k=TOP_K,
                                           d_model=HIDDEN, n_heads=2, expert_hidden_size=16))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in olmoe_routers(model):
            directions = torch.randn(EXPERTS // 2, HIDDEN, generator=generator)
            rows = directions.repeat_interleave(2, dim=0) + 0.05 * torch.randn(EXPERTS, HIDDEN, generator=generator)
            router.weight.copy_(rows)
    return model


PERMUTATION = [0, 2, 1, 4, 3, 5]  # m1 with these router rows: its partner pairs become 0-2, 1-4, 3-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    for seed in (0, 1):
        save_checkpoint(_hand_built(seed), str(folder / f"m{seed}"))
    permuted = _hand_built(1)
    with torch.no_grad():
        for router in olmoe_routers(permuted):
            router.weight.copy_(router.weight[PERMUTATION])
    save_checkpoint(permuted, str(folder / "m1p"))
    return folder


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    """Hand-chosen tokens (byte ids), raw uint16 as OLMo-core stores them: 3 windows of 40."""
    path = tmp_path_factory.mktemp("tokens") / "part-0.npy"
    text = b"GatePro keeps similar experts apart. " * 4
    np.frombuffer(text[:120], dtype=np.uint8).astype(np.uint16).tofile(path)
    return path


def _independent(model, tokens: torch.Tensor, penalties: dict[str, float]) -> list[dict]:
    """Per layer, from the routers' inputs captured here and the plain-loop references."""
    from transformers import OlmoeForCausalLM

    model = OlmoeForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    routers = olmoe_routers(model)
    captured = [[] for _ in routers]
    handles = [router.register_forward_hook(lambda m, a, o, i=i: captured[i].append((a[0], o[2])))
               for i, router in enumerate(routers)]
    with torch.no_grad():
        for window in tokens.split(40):
            model(input_ids=window[None])
    for handle in handles:
        handle.remove()
    layers = []
    for router, pieces in zip(routers, captured):
        weight = router.weight.detach()
        hidden = torch.cat([h.reshape(-1, HIDDEN) for h, _ in pieces])
        chosen = torch.cat([c for _, c in pieces])
        logits = hidden @ weight.T
        counts = [sum(int(e) == expert for row in chosen.tolist() for e in row) for expert in range(EXPERTS)]
        stock = [set(row) for row in logits.topk(TOP_K, -1).indices.tolist()]
        flips = {}
        for key, penalty in penalties.items():
            penalised = reference_gatepro(logits, weight, penalty).topk(TOP_K, -1).indices.tolist()
            flips[key] = sum(set(row) != before for row, before in zip(penalised, stock)) / len(stock)
        layers.append({
            "partners": reference_partners(weight),
            "expert_tokens": counts,
            "zero_token_count": counts.count(0),
            "partner_coactivation": reference_partner_coactivation(chosen, weight),
            "margin_below": {key: reference_margin_fraction(logits, TOP_K, p) for key, p in penalties.items()},
            "flip_rate": flips,
            "pairs": [[sum(a in row and b in row for row in chosen.tolist()) for b in range(EXPERTS)]
                      for a in range(EXPERTS)],
        })
    return layers


def test_metrics_match_an_independent_computation(models, token_file):
    penalties = {"0.01": 0.01, "5e-2": 0.05, "1": 1.0}
    routing = inspect_models([ModelToInspect(str(models / "m0"), "m0")], TextSource(tokens=str(token_file),
                             sequence_length=40), penalties=tuple(penalties))
    tokens = torch.from_numpy(np.fromfile(token_file, dtype=np.uint16).astype(np.int64))
    expected = _independent(str(models / "m0"), tokens, penalties)
    (model,) = routing["models"]
    assert model["tokens"] == 120 and model["sequence_length"] == 40 and model["gatepro"] is None
    for got, want in zip(model["layers"], expected, strict=True):
        assert got["partners"] == want["partners"] == PAIRS
        assert got["expert_tokens"] == want["expert_tokens"]
        assert got["zero_token_count"] == want["zero_token_count"]
        assert got["coactivation_matrix"] == [[want["pairs"][a][b] if a != b else want["expert_tokens"][a]
                                               for b in range(EXPERTS)] for a in range(EXPERTS)]
        assert got["partner_coactivation"] == pytest.approx(want["partner_coactivation"])
        assert got["partner_coactivation_chance"] == pytest.approx((TOP_K - 1) / (EXPERTS - 1))
        assert got["margin_below"] == pytest.approx(want["margin_below"])
        assert got["flip_rate"] == pytest.approx(want["flip_rate"])
        assert got["boundary_margin_quantiles"]["min"] <= got["boundary_margin_quantiles"]["p50"]
        assert set(got["margin_below"]) == set(penalties)
    flips = [layer["flip_rate"]["1"] for layer in model["layers"]]
    assert any(rate > 0 for rate in flips)  # a lambda of 1 re-routes tokens: the comparison is not vacuous


def test_arms_get_a_verdict_and_can_be_scored_on_the_baseline_partner_pairs(models, token_file, tmp_path):
    source = TextSource(tokens=str(token_file), sequence_length=40)
    specs = [ModelToInspect(str(models / "m0"), "m0", arm="base"), ModelToInspect(str(models / "m1p"), "m1p", arm="gp")]
    own = inspect_models(specs, source)
    shared = inspect_models(specs, source, baseline_partners=True)
    assert own["models"][1]["partners_from"] == "m1p" and shared["models"][1]["partners_from"] == "m0"
    tokens = torch.from_numpy(np.fromfile(token_file, dtype=np.uint16).astype(np.int64))
    from transformers import OlmoeForCausalLM

    baseline_weights = [router.weight.detach() for router in olmoe_routers(OlmoeForCausalLM.from_pretrained(models / "m0"))]
    for layer, want, base_weight in zip(shared["models"][1]["layers"], _independent(str(models / "m1p"), tokens, {}),
                                        baseline_weights, strict=True):
        assert layer["partners"] == [PERMUTATION.index(PAIRS[e]) for e in PERMUTATION]  # its own pairs, recorded
        assert reference_partners(base_weight) == PAIRS
        # of m1p's chosen experts i, the share whose baseline partner PAIRS[i] is chosen for the same token too
        on_baseline_pairs = sum(want["pairs"][i][PAIRS[i]] for i in range(EXPERTS)) / sum(want["expert_tokens"])
        assert layer["partner_coactivation"] == pytest.approx(on_baseline_pairs)
        assert layer["partner_coactivation"] != pytest.approx(want["partner_coactivation"])  # not its own pairs' rate
    for layer, own_layer in zip(shared["models"][0]["layers"], own["models"][0]["layers"]):
        assert layer == own_layer  # the baseline itself is scored as before
    markdown = to_markdown(shared)
    assert "## Verdict" in markdown and "**gp** vs base, on the same text (1 and 1 seeds, unpaired;" in markdown
    assert "no claim about the method with fewer than 3 seeds per arm" in markdown
    assert "scored on the baseline's partner pairs" in markdown and "partner co-activation (points)" in markdown
    with pytest.raises(ValueError, match="--paired-seeds needs as many models in every arm"):
        inspect_models(specs + [ModelToInspect(str(models / "m1"), "m1", arm="gp")], source, paired_seeds=True)


def test_two_models_side_by_side_from_text_files(models, tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text("Experts that look alike should not be chosen together. " * 20)
    out = tmp_path / "report"
    argv = ["inspect", str(models / "m0"), str(models / "m1"), "--label", "base", "gp", "--gatepro-penalty", "0", "0.5",
            "--text", str(text), "--sequence-length", "64", "--max-tokens", "500", "--penalties", "1e-2", "0.5",
            "--out", str(out)]
    assert main(argv) == 0
    assert "base: 500 tokens, 2 MoE layers" in capsys.readouterr().out
    routing = json.loads((out / "routing.json").read_text())
    base, gatepro = routing["models"]
    assert (base["label"], base["gatepro"], gatepro["gatepro"]["penalty"]) == ("base", None, 0.5)
    assert base["tokens"] == gatepro["tokens"] == 500 and routing["penalties"] == ["1e-2", "0.5"]
    assert routing["text"] == {"texts": [str(text)], "max_tokens": 500}
    keys = {"layer", "expert_tokens", "zero_token_count", "load_imbalance", "load_entropy", "partner_coactivation",
            "partner_coactivation_chance", "boundary_margin_quantiles", "margin_below", "flip_rate",
            "avg_cosine_similarity", "avg_angle_deg", "spectral_entropy"}
    assert keys <= set(base["layers"][0])
    with open(out / "routing.csv") as file:
        rows = list(csv.DictReader(file))
    row = next(r for r in rows if r["layer"] == "1" and r["metric"] == "partner co-activation")
    assert float(row["gp - base"]) == pytest.approx(float(row["gp"]) - float(row["base"]))
    assert float(row["base"]) == pytest.approx(base["layers"][1]["partner_coactivation"])
    markdown = (out / "routing.md").read_text()
    assert "| base | gp | gp - base |" in markdown and "| 1 | flip rate at 0.5 |" in markdown
    assert {"routing_layers.png", "coactivation_0_base.png", "coactivation_1_gp.png"} <= set(os.listdir(out))


def test_default_text_is_the_shipped_benchmark_items(models, tmp_path):
    routing = inspect_models([ModelToInspect(str(models / "m0"), "m0")], TextSource(max_tokens=300, sequence_length=100))
    assert routing["models"][0]["tokens"] == 300 and "benchmark_texts" in routing["text"]


def test_bad_input_is_refused_and_writes_nothing(models, token_file, tmp_path, capsys, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    monkeypatch.chdir(tmp_path)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the hub path, without the network
    m0 = str(models / "m0")
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained("dense")
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "odd.npy").write_bytes(b"\x01\x02\x03")
    (tmp_path / "big.npy").write_bytes(np.array([300], dtype=np.uint16).tobytes())
    os.mkdir("no-model")
    out = ["--out", "report"]
    before = _snapshot(tmp_path)
    _refused(["inspect", "nowhere/at/all", *out], capsys, "model nowhere/at/all: no such folder")
    _refused(["inspect", "no-model", *out], capsys, "model no-model: a folder with neither a config.json")
    _refused(["inspect", "someone/no-such-model", *out], capsys, "model someone/no-such-model: cannot be loaded")
    _refused(["inspect", "dense", *out], capsys, "model dense: LlamaForCausalLM has no MoE router", "needs an MoE")
    _refused(["inspect", m0, "--tokens", "empty.npy", *out], capsys, "--tokens empty.npy: the file holds no tokens")
    _refused(["inspect", m0, "--tokens", "odd.npy", *out], capsys, "--tokens odd.npy: 3 bytes is not a whole number")
    _refused(["inspect", m0, "--tokens", "big.npy", *out], capsys, "token id 300 is outside m0's vocabulary")
    _refused(["inspect", m0, "--tokens", "missing.npy", *out], capsys, "--tokens missing.npy: no such file")
    _refused(["inspect", m0, "--tokens", str(token_file), "--sequence-length", "5000", *out], capsys,
             "--sequence-length 5000: longer than m0's context (4096 tokens)")
    _refused(["inspect", m0, m0, *out], capsys, "two models have the same label")
    _refused(["inspect", m0, "--label", "a", "b", *out], capsys, "--label is given 2 times for 1 models")
    _refused(["inspect", m0, "--arm", "a", "b", *out], capsys, "--arm is given 2 times for 1 models")
    _refused(["inspect", m0, m0, "--label", "a", "b", "--revision", "x", "y", "z", *out], capsys,
             "--revision is given 3 times for 2 models")
    _refused(["inspect", m0, "--penalties", "0", *out], capsys, "--penalties '0': each lambda must be a finite number > 0")
    _refused(["inspect", m0, "--penalties", "1e-2", "1e-2", *out], capsys, "--penalties '1e-2': given twice")
    _refused(["inspect", m0, "--gatepro-penalty", "-1", *out], capsys, "--gatepro-penalty: penalty must be finite")
    _refused(["inspect", m0, "--max-tokens", "0", *out], capsys, "--max-tokens must be >= 1; got 0")
    _refused(["inspect", m0, "--text", "missing.txt", *out], capsys, "--text missing.txt: no such file")
    _refused(["inspect", m0, "--out", "empty.npy"], capsys, "--out empty.npy: exists and is not a folder")
    assert _snapshot(tmp_path) == before
    os.mkdir("report")
    (tmp_path / "report" / "routing.json").write_text("{}")
    _refused(["inspect", m0, *out], capsys, "--out report already holds routing.json; pass --overwrite")
    assert (tmp_path / "report" / "routing.json").read_text() == "{}"
