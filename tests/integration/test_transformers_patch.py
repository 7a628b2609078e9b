import os
import subprocess
import sys

import pytest
import torch

import olmoe_gatepro
from olmoe_gatepro import gatepro_settings, patch_transformers, set_gatepro, unpatch
from olmoe_gatepro.pipelines.presets import TinyRunConfig
from olmoe_gatepro.pipelines.tiny_run import build_tiny_olmoe
from olmoe_gatepro import refresh_partners
from olmoe_gatepro.transformers.conformance import loss_and_grads, record_routing, step_differences
from olmoe_gatepro.transformers.patch import olmoe_routers
from olmoe_gatepro.core.reference import reference_gatepro

TINY = TinyRunConfig(d_model=32, n_layers=3, n_heads=2, num_experts=8, top_k=2, expert_hidden_size=16)
PENALTY = 0.05  # large enough to flip choices in a random tiny model, so the tests can fail


@pytest.fixture(autouse=True)
def always_unpatch():
    unpatch()
    yield
    unpatch()


def _tokens(seed=0, batch=4, length=24):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def _model(seed=0, dtype=torch.float32):
    import dataclasses

    return build_tiny_olmoe(dataclasses.replace(TINY, seed=seed)).to(dtype).eval()


def _assert_routes_with_gatepro(model, penalty):
    seen, _ = record_routing(model, _tokens())
    flipped = 0
    for router, hidden, (logits, weights, chosen) in seen:
        raw = torch.nn.functional.linear(hidden, router.weight)
        expected = reference_gatepro(raw, router.weight, penalty)
        torch.testing.assert_close(logits, expected, rtol=0, atol=0)
        expected_probs = torch.softmax(expected, dim=-1)
        assert torch.equal(chosen, expected_probs.topk(router.top_k, dim=-1).indices)
        torch.testing.assert_close(weights, expected_probs.gather(-1, chosen).to(weights.dtype))
        flipped += (chosen.sort(-1).values != raw.topk(router.top_k, -1).indices.sort(-1).values).any(-1).sum()
    assert flipped > 0, "the penalty changed no choice: this test would not see a broken patch"


def test_class_patch_covers_models_built_before_and_after():
    before = _model(seed=1)
    patch_transformers(penalty=PENALTY)
    after = _model(seed=2)
    _assert_routes_with_gatepro(before, PENALTY)
    _assert_routes_with_gatepro(after, PENALTY)


def test_instance_patch_touches_only_that_model():
    patched, untouched = _model(seed=3), _model(seed=3)
    patch_transformers(model=patched, penalty=PENALTY)
    _assert_routes_with_gatepro(patched, PENALTY)
    fresh = _model(seed=3)
    torch.testing.assert_close(
        record_routing(untouched, _tokens())[1].logits, record_routing(fresh, _tokens())[1].logits, rtol=0, atol=0
    )


def test_patching_twice_is_harmless_and_unpatch_restores_stock_exactly():
    stock_logits = record_routing(_model(), _tokens())[1].logits
    model = _model()
    patch_transformers(penalty=PENALTY)
    patch_transformers(penalty=PENALTY)
    patch_transformers(model=model, penalty=PENALTY)
    _assert_routes_with_gatepro(model, PENALTY)
    assert not torch.equal(record_routing(model, _tokens())[1].logits, stock_logits)
    unpatch()
    assert torch.equal(record_routing(model, _tokens())[1].logits, stock_logits)
    assert torch.equal(record_routing(_model(), _tokens())[1].logits, stock_logits)
    router_class = type(olmoe_routers(model)[0])
    assert "_gatepro" not in router_class.__dict__ and not hasattr(olmoe_routers(model)[0], "_gatepro")


def test_hot_swap_on_a_live_model_changes_no_state():
    model = _model()
    stock_logits = record_routing(_model(), _tokens())[1].logits
    patch_transformers(model=model, penalty=PENALTY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=_tokens(), labels=_tokens()).loss.backward()
    optimizer.step()
    stock_after_step = None
    params_before = {k: v.clone() for k, v in model.state_dict().items()}
    optim_before = {k: {n: t.clone() for n, t in s.items()} for k, s in optimizer.state_dict()["state"].items()}

    set_gatepro(model, enabled=False)
    stock_after_step = record_routing(model, _tokens())[1].logits
    set_gatepro(model, enabled=True)
    _assert_routes_with_gatepro(model, PENALTY)
    with gatepro_settings(model, enabled=False):
        assert torch.equal(record_routing(model, _tokens())[1].logits, stock_after_step)
    _assert_routes_with_gatepro(model, PENALTY)
    with gatepro_settings(model, penalty=2 * PENALTY):
        _assert_routes_with_gatepro(model, 2 * PENALTY)
    _assert_routes_with_gatepro(model, PENALTY)

    assert model.state_dict().keys() == params_before.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, params_before[key]), key
    for key, state in optimizer.state_dict()["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, optim_before[key][name])
    assert not torch.equal(stock_after_step, stock_logits)  # the optimizer step did train


def test_hot_swap_needs_a_patched_model():
    with pytest.raises(RuntimeError, match="no GatePro-routed router"):
        set_gatepro(_model(), enabled=False)


def test_unknown_setting_is_rejected_by_name():
    with pytest.raises(ValueError, match="penalti"):
        patch_transformers(penalti=1e-3)
    with pytest.raises(ValueError, match="-1.0"):
        patch_transformers(penalty=-1.0)


def test_recorded_router_logits_agree_with_chosen_experts():
    model = _model()
    patch_transformers(model=model, penalty=PENALTY)
    seen, output = record_routing(model, _tokens(), output_router_logits=True)
    assert len(output.router_logits) == TINY.n_layers
    for recorded, (_, _, (_, _, chosen)) in zip(output.router_logits, seen):
        assert recorded.dtype == torch.float32
        assert torch.equal(torch.softmax(recorded, -1).topk(TINY.top_k, -1).indices, chosen)
    assert output.aux_loss is not None and torch.isfinite(output.aux_loss)


def test_bf16_model_routes_in_float32():
    model = _model(dtype=torch.bfloat16)
    patch_transformers(model=model, penalty=1e-4)
    seen, output = record_routing(model, _tokens())
    for router, hidden, (logits, weights, chosen) in seen:
        assert logits.dtype == torch.bfloat16 and weights.dtype == torch.bfloat16  # stock's dtypes
        raw = torch.nn.functional.linear(hidden, router.weight)
        penalised = reference_gatepro(raw, router.weight, 1e-4)  # float32: 1e-4 survives
        assert (penalised != raw.float()).any()
        probs = torch.softmax(penalised, -1)
        assert torch.equal(chosen, probs.topk(TINY.top_k, -1).indices)  # chosen in float32
        torch.testing.assert_close(weights, probs.topk(TINY.top_k, -1).values.to(torch.bfloat16), rtol=0, atol=0)
        # the returned logits are the penalised ones at bf16's precision (within one bf16 rounding)
        torch.testing.assert_close(logits.float(), penalised, rtol=2**-8, atol=1e-5)
    assert torch.isfinite(output.logits).all()


def test_cached_partner_table_refreshes_on_schedule():
    model = _model()
    patch_transformers(model=model, penalty=PENALTY, partner_refresh_steps=2)
    router = olmoe_routers(model)[0]
    before = router._gatepro_partners.clone()
    with torch.no_grad():
        router.weight.copy_(router.weight.flip(0))  # the partner of i becomes that of N-1-i
    fresh = olmoe_gatepro.competition_partners(router.weight)
    assert not torch.equal(fresh, before)
    assert not refresh_partners(model, step=1)
    assert torch.equal(router._gatepro_partners, before)
    assert refresh_partners(model, step=2)
    assert torch.equal(router._gatepro_partners, fresh)
    _assert_routes_with_gatepro(model, PENALTY)
    assert "_gatepro_partners" not in "".join(model.state_dict())


def test_unsupported_transformers_version_fails_clearly(monkeypatch):
    # transformers swaps its own sys.modules entry when it first loads a model: patch the live one.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.46.0")
    with pytest.raises(RuntimeError, match=r"supports transformers .*<6.*>=5.23|supports transformers .*>=5.23.*<6"):
        patch_transformers()


def test_patched_router_compiles_without_graph_breaks():
    model = _model()
    patch_transformers(model=model, penalty=PENALTY)
    router = olmoe_routers(model)[0]
    hidden = torch.randn(40, TINY.d_model)
    explanation = torch._dynamo.explain(router)(hidden)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(router, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(hidden), router(hidden)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_checkpoint_saved_with_gatepro_loads_in_a_process_without_the_plugin(tmp_path):
    model = _model(seed=5)
    stock_keys = set(model.state_dict())
    patch_transformers(penalty=PENALTY)
    patch_transformers(model=model, penalty=PENALTY, partner_refresh_steps=1)
    assert set(model.state_dict()) == stock_keys
    model.save_pretrained(tmp_path / "ckpt")
    input_ids = _tokens(seed=9)
    torch.save(input_ids, tmp_path / "input_ids.pt")
    unpatch()
    expected = record_routing(model, input_ids)[1].logits
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import sys, torch
from transformers import OlmoeForCausalLM
model = OlmoeForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}).eval()
with torch.no_grad():
    logits = model(input_ids=torch.load({str(tmp_path / 'input_ids.pt')!r})).logits
assert not any(name.startswith("olmoe_gatepro") for name in sys.modules)
assert torch.equal(logits, torch.load({str(tmp_path / 'expected.pt')!r})), "outputs differ"
print("loaded", sum(p.numel() for p in model.parameters()))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("loaded")


def test_unpatch_after_class_patch_and_hot_swap_leaves_no_gatepro_state():
    model = _model()
    stock_logits = record_routing(_model(), _tokens())[1].logits
    patch_transformers(penalty=PENALTY)
    set_gatepro(model, penalty=2 * PENALTY)
    _assert_routes_with_gatepro(model, 2 * PENALTY)
    unpatch()
    assert all(not hasattr(router, "_gatepro") for router in olmoe_routers(model))
    assert torch.equal(record_routing(model, _tokens())[1].logits, stock_logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_penalty_zero_is_stock_bit_for_bit(dtype):
    """With GatePro on at lambda = 0, loss, aux loss and gradients are stock's exactly, in every dtype."""
    tokens = _tokens(seed=5)
    stock = loss_and_grads(_model(seed=4, dtype=dtype).train(), tokens)
    patched_model = _model(seed=4, dtype=dtype).train()
    patch_transformers(model=patched_model, penalty=0.0)
    assert step_differences(stock, loss_and_grads(patched_model, tokens)) == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_router_outputs_keep_stock_dtypes(dtype):
    model = _model(dtype=dtype)
    patch_transformers(model=model, penalty=PENALTY)
    router = olmoe_routers(model)[0]
    logits, weights, index = router(torch.randn(6, TINY.d_model, dtype=dtype))
    assert logits.dtype == dtype and weights.dtype == dtype and index.dtype == torch.int64


def test_a_single_expert_model_works_under_the_class_patch():
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    config = OlmoeConfig(vocab_size=256, hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, num_experts=1, num_experts_per_tok=1, pad_token_id=None,
                         bos_token_id=None, eos_token_id=None)
    model = OlmoeForCausalLM(config).eval()
    tokens = _tokens()
    expected = model(tokens).logits
    patch_transformers(penalty=PENALTY)
    assert torch.equal(model(tokens).logits, expected)  # nothing to compete with: stock routing
