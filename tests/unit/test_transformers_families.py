"""GatePro in each supported transformers MoE family, on tiny randomly initialised models."""

import pytest
import torch
import torch.nn.functional as F

from olmoe_gatepro import patch_transformers, set_gatepro, unpatch
from olmoe_gatepro.core.reference import reference_gatepro
from olmoe_gatepro.transformers.families import FAMILIES
from olmoe_gatepro.transformers.patch import moe_routers

PENALTY = 0.5  # flips choices in these tiny random models, so agreement with the reference means something
COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              num_experts_per_tok=2, pad_token_id=None, bos_token_id=None, eos_token_id=None)


def _config(family):
    import transformers

    if family == "olmoe":
        return transformers.OlmoeConfig(**COMMON, num_experts=8, intermediate_size=16), transformers.OlmoeForCausalLM
    if family == "qwen2_moe":  # with a shared expert, renormalised top-k
        return (transformers.Qwen2MoeConfig(**COMMON, num_experts=8, moe_intermediate_size=16, intermediate_size=32,
                                            shared_expert_intermediate_size=16, norm_topk_prob=True),
                transformers.Qwen2MoeForCausalLM)
    if family == "qwen3_moe":
        return (transformers.Qwen3MoeConfig(**COMMON, num_experts=8, moe_intermediate_size=16, intermediate_size=32,
                                            head_dim=8), transformers.Qwen3MoeForCausalLM)
    if family == "flex_olmo":
        return transformers.FlexOlmoConfig(**COMMON, num_experts=8, intermediate_size=16), transformers.FlexOlmoForCausalLM
    if family == "mixtral":  # top-k weights always renormalised, kept in float32
        return (transformers.MixtralConfig(**COMMON, num_local_experts=8, intermediate_size=16),
                transformers.MixtralForCausalLM)
    raise AssertionError(family)


def _model(family, dtype=torch.float32, seed=0, wide=True):
    config, cls = _config(family)
    config.output_router_logits = True
    torch.manual_seed(seed)
    model = cls(config).to(dtype).eval()
    if wide:
        with torch.no_grad():  # wider than the init, so the penalty moves choices and the tests can fail
            for router in moe_routers(model):
                router.weight.normal_(0, 0.5)
    return model


def _tokens():
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(7))


def _routed(model):
    """Per router: (module, its input (T, d), its outputs) of one forward."""
    seen = []
    hooks = [r.register_forward_hook(lambda m, args, out: seen.append((m, args[0].reshape(-1, m.hidden_dim), out)))
             for r in moe_routers(model)]
    with torch.no_grad():
        logits = model(_tokens()).logits
    for hook in hooks:
        hook.remove()
    return seen, logits


@pytest.fixture(autouse=True)
def always_unpatch():
    unpatch()
    yield
    unpatch()


FAMILY_NAMES = list(FAMILIES)


def test_the_table_covers_the_families_the_issue_names():
    assert {"olmoe", "qwen2_moe", "qwen3_moe", "flex_olmo", "mixtral"} <= set(FAMILY_NAMES)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_layer_routes_as_the_reference(family):
    model = _model(family)
    patch_transformers(model=model, penalty=PENALTY)
    seen, _ = _routed(model)
    assert len(seen) == 2
    changed = 0
    for router, hidden, (logits, weights, chosen) in seen:
        raw = F.linear(hidden, router.weight)
        penalised = reference_gatepro(raw, router.weight, PENALTY)
        probs = penalised.softmax(-1)
        expected_weights, expected = probs.topk(router.top_k, -1)
        assert torch.equal(chosen, expected)
        if FAMILIES[family].renormalise == "always" or (FAMILIES[family].renormalise == "config" and router.norm_topk_prob):
            expected_weights = expected_weights / expected_weights.sum(-1, keepdim=True)
        torch.testing.assert_close(weights, expected_weights)
        torch.testing.assert_close(logits, penalised, rtol=0, atol=0)
        changed += int((raw.softmax(-1).topk(router.top_k, -1).indices.sort(-1).values != chosen.sort(-1).values).any())
    assert changed  # the penalty changed some choice, so equality with the reference says something


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_bf16_outputs_have_stock_dtypes(family):
    model = _model(family, dtype=torch.bfloat16)
    stock = [(out[0].dtype, out[1].dtype, out[2].dtype) for _, _, out in _routed(model)[0]]
    patch_transformers(model=model, penalty=PENALTY)
    assert [(out[0].dtype, out[1].dtype, out[2].dtype) for _, _, out in _routed(model)[0]] == stock


def _loss_and_grads(model):
    model.zero_grad(set_to_none=True)
    output = model(input_ids=_tokens(), labels=_tokens(), output_router_logits=True)
    output.loss.backward()
    return [output.loss.detach(), output.aux_loss.detach()] + [p.grad.clone() for p in model.parameters()
                                                                  if p.grad is not None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_penalty_zero_is_stock_bit_for_bit(family, dtype):
    stock = _loss_and_grads(_model(family, dtype, wide=False).train())
    model = _model(family, dtype, wide=False).train()
    patch_transformers(model=model, penalty=0.0)
    patched = _loss_and_grads(model)
    assert len(stock) == len(patched) and all(torch.equal(a, b) for a, b in zip(stock, patched))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_hot_swap_unpatch_and_state_dict_keys(family):
    model = _model(family)
    _, stock_logits = _routed(model)
    keys = list(model.state_dict())
    patch_transformers(model=model, penalty=PENALTY)
    _, gatepro_logits = _routed(model)
    assert not torch.equal(gatepro_logits, stock_logits)
    assert list(model.state_dict()) == keys  # nothing added to the state dict
    set_gatepro(model, enabled=False)
    assert torch.equal(_routed(model)[1], stock_logits)  # hot swap: off is stock
    set_gatepro(model, enabled=True)
    assert torch.equal(_routed(model)[1], gatepro_logits)
    unpatch()
    assert torch.equal(_routed(model)[1], stock_logits)  # exactly stock again
    assert all("forward" not in router.__dict__ for router in moe_routers(model))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_router_compiles_without_graph_breaks(family):
    model = _model(family)
    patch_transformers(model=model, penalty=PENALTY)
    router = moe_routers(model)[0]
    hidden = torch.randn(10, 32, generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    assert torch._dynamo.explain(router)(hidden).graph_break_count == 0
    compiled = torch.compile(router, fullgraph=True, backend="aot_eager")  # exact; inductor may fuse to 1 ulp
    for got, want in zip(compiled(hidden), router(hidden)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    set_gatepro(model, enabled=False)  # the switched-off path (it checks for a metrics recording) too
    torch._dynamo.reset()
    assert torch._dynamo.explain(router)(hidden).graph_break_count == 0


def test_class_wide_patch_takes_the_families_to_patch():
    mixtral, qwen = _model("mixtral"), _model("qwen3_moe")
    _, qwen_stock = _routed(qwen)
    _, mixtral_stock = _routed(mixtral)
    patch_transformers(penalty=PENALTY, families=["mixtral"])
    assert not torch.equal(_routed(mixtral)[1], mixtral_stock)
    assert torch.equal(_routed(qwen)[1], qwen_stock)  # not asked for: stock
    patch_transformers(penalty=PENALTY)  # default: every supported family
    assert not torch.equal(_routed(qwen)[1], qwen_stock)
    unpatch()
    assert torch.equal(_routed(qwen)[1], qwen_stock) and torch.equal(_routed(mixtral)[1], mixtral_stock)


def test_families_that_gatepro_does_not_fit_are_refused_with_the_reason():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    model = torch.nn.ModuleList([DeepseekV3TopkRouter(DeepseekV3Config(hidden_size=32, n_routed_experts=8))])
    with pytest.raises(ValueError, match="sigmoid plus a correction bias"):
        patch_transformers(model=model)
    with pytest.raises(ValueError, match=r"unknown or unsupported family \['deepseek_v3'\]"):
        patch_transformers(families=["deepseek_v3"])
    with pytest.raises(ValueError, match="has no MoE router of a supported family"):
        patch_transformers(model=torch.nn.Linear(2, 2))
