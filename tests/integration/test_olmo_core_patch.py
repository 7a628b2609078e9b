import re
import sys

import pytest
import torch
import torch.nn.functional as F
from olmo_core.nn.moe.loss import MoELoadBalancingLossGranularity, load_balancing_loss, router_z_loss
from olmo_core.nn.moe.router import MoELinearRouter
from olmo_core.nn.moe.v2.router import MoERouterV2

from olmoe_gatepro import patch_olmo_core, set_gatepro, unpatch
from olmoe_gatepro.core.reference import reference_gatepro
from olmoe_gatepro.olmo_core.conformance import LB_LOSS_WEIGHT, Z_LOSS_WEIGHT, linear_router

D_MODEL, EXPERTS, TOP_K = 16, 8, 2
PENALTY = 0.3


@pytest.fixture(autouse=True)
def always_unpatch():
    unpatch()
    yield
    unpatch()


def _router(seed=0, cls=MoELinearRouter):
    return linear_router(seed, d_model=D_MODEL, num_experts=EXPERTS, top_k=TOP_K, router_class=cls)


def _inputs(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3, 20, D_MODEL, generator=generator), torch.randn(3, 20, TOP_K, generator=generator)


def _run(router, x, upstream):
    x = x.clone().requires_grad_(True)
    weights, indices, counts, aux_loss = router(x)
    ((weights * upstream).sum() + aux_loss).backward()
    return weights.detach(), indices, counts, aux_loss.detach(), x.grad, router.weight.grad.clone()


def _reference(router, x, upstream, penalty):
    """OLMoE routing from reference-penalised logits: softmax over all, top-k, both aux losses."""
    weight = router.weight.detach().clone().requires_grad_(True)
    x = x.clone().requires_grad_(True)
    logits = F.linear(x, weight.view(EXPERTS, D_MODEL))
    delta = reference_gatepro(logits.detach(), weight.detach().view(EXPERTS, D_MODEL), penalty) - logits.detach()
    penalised = logits + delta
    scores = penalised.softmax(dim=-1)
    weights, indices = scores.topk(TOP_K, dim=-1)
    batched = torch.zeros(*indices.shape[:-1], EXPERTS, dtype=indices.dtype).scatter_add_(
        -1, indices, torch.ones_like(indices)
    ).sum(dim=1)
    counts = batched.sum(dim=0)
    lb = load_balancing_loss(
        num_experts=EXPERTS, top_k=TOP_K, expert_scores=scores, batch_size_per_expert=counts,
        batched_batch_size_per_expert=batched, granularity=MoELoadBalancingLossGranularity.local_batch,
    )
    aux = LB_LOSS_WEIGHT * lb + Z_LOSS_WEIGHT * router_z_loss(expert_logits=penalised)
    ((weights * upstream).sum() + aux).backward()
    return weights.detach(), indices, counts, aux.detach(), x.grad, weight.grad, logits


def test_patched_router_matches_the_reference_routing_losses_and_gradients():
    router = _router()
    x, upstream = _inputs()
    stock = _run(_router(), x, upstream)
    patch_olmo_core(penalty=PENALTY)
    got = _run(router, x, upstream)
    expected = _reference(router, x, upstream, PENALTY)
    assert torch.equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2])
    for name, index in (("weights", 0), ("aux loss", 3), ("x grad", 4), ("weight grad", 5)):
        torch.testing.assert_close(got[index], expected[index], rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(got[1], stock[1]), "the penalty moved no choice: the test could not fail"


def test_unpatch_restores_stock_results_exactly():
    x, upstream = _inputs()
    stock = _run(_router(), x, upstream)
    patch_olmo_core(penalty=PENALTY)
    patched = _run(_router(), x, upstream)
    assert not torch.equal(patched[1], stock[1])
    unpatch()
    again = _run(_router(), x, upstream)
    for a, b in zip(stock, again):
        assert torch.equal(a, b)
    assert "_gatepro" not in MoELinearRouter.__dict__


def test_instance_patch_and_hot_swap():
    x, upstream = _inputs()
    stock = _run(_router(), x, upstream)
    model = torch.nn.ModuleList([_router(), _router()])
    patch_olmo_core(model=model, penalty=PENALTY)
    expected = _reference(_router(), x, upstream, PENALTY)
    assert torch.equal(_run(model[0], x, upstream)[1], expected[1])
    assert torch.equal(_run(_router(), x, upstream)[1], stock[1])  # other routers untouched
    set_gatepro(model, enabled=False)
    assert torch.equal(_run(model[1], x, upstream)[1], stock[1])
    unpatch()
    assert not hasattr(model[0], "_gatepro") and "get_expert_logits" not in model[0].__dict__


def test_v2_router_is_patched_too():
    x, _ = _inputs()
    router = _router(cls=MoERouterV2)
    weights, indices, _, _ = router(x, False)
    patch_olmo_core(penalty=PENALTY)
    got_weights, got_indices, _, aux_info = router(x, False)
    logits = F.linear(x, router.weight.detach().view(EXPERTS, D_MODEL))
    penalised = reference_gatepro(logits, router.weight.detach().view(EXPERTS, D_MODEL), PENALTY)
    assert torch.equal(got_indices, penalised.softmax(-1).topk(TOP_K, -1).indices)
    torch.testing.assert_close(aux_info[1], penalised)  # what its aux losses see
    assert not torch.equal(got_indices, indices)


def test_patch_adds_no_graph_break():
    router = _router().eval()
    x, _ = _inputs()
    stock_breaks = torch._dynamo.explain(router)(x).graph_break_count
    patch_olmo_core(penalty=PENALTY)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(router)(x)
    assert explanation.graph_break_count == stock_breaks == 0
    compiled = torch.compile(router, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(x), router(x)):
        if got is not None:
            torch.testing.assert_close(got, expected)


def test_a_recording_router_compiles_in_one_graph_and_tallies_as_eager():
    """The callbacks' metric steps record in route() (core/metrics.RoutingTally): no graph break there either
    (a bincount was one), and the compiled tally equals the eager one."""
    from olmoe_gatepro.core.router_state import start_recording, stop_recording

    router = _router().eval()
    x, _ = _inputs()
    patch_olmo_core(penalty=PENALTY)
    torch._dynamo.reset()
    start_recording(router)
    assert torch._dynamo.explain(router)(x).graph_break_count == 0
    stop_recording(router)
    tallies = []
    for forward in (router, torch.compile(router, fullgraph=True, backend="aot_eager")):
        start_recording(router)
        forward(x)
        tallies.append(stop_recording(router).counts)
    assert torch.equal(*tallies) and tallies[0][:EXPERTS].sum() == x.shape[0] * x.shape[1] * TOP_K


def test_state_dict_keys_unchanged_and_cached_partners():
    router = _router()
    keys = set(router.state_dict())
    model = torch.nn.ModuleList([router])
    patch_olmo_core(model=model, penalty=PENALTY, partner_refresh_steps=3)
    assert set(router.state_dict()) == keys
    x, upstream = _inputs()
    expected = _reference(router, x, upstream, PENALTY)
    assert torch.equal(_run(router, x, upstream)[1], expected[1])


def test_unsupported_olmo_core_version_fails_clearly(monkeypatch):
    monkeypatch.setattr(sys.modules["olmo_core.version"], "VERSION", "2.9.0")
    with pytest.raises(RuntimeError, match=r"ai2-olmo-core >=3.0,<3.1; installed is 2.9.0"):
        patch_olmo_core()


def test_fsdp_sharded_router_routes_exactly_as_unsharded(tmp_path):
    import os
    import subprocess
    from pathlib import Path

    worker = Path(__file__).parents[1] / "fsdp_router_worker.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=0",
               "--rdzv_backend=c10d", "--rdzv_endpoint=127.0.0.1:0", str(worker)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "rank 0: sharded routing equals unsharded" in result.stdout
    assert "rank 1: sharded routing equals unsharded" in result.stdout


def test_a_single_expert_router_works_under_the_class_patch():
    torch.manual_seed(0)
    router = MoELinearRouter(d_model=D_MODEL, num_experts=1, top_k=1, lb_loss_weight=LB_LOSS_WEIGHT, z_loss_weight=Z_LOSS_WEIGHT)
    x = torch.randn(2, 5, D_MODEL)
    expected = router(x)
    patch_olmo_core(penalty=PENALTY)  # class-wide: GatePro has no competitor to compare here
    for got, want in zip(router(x), expected):
        assert torch.equal(got, want)


DEEPSEEK_LIKE = [  # (router class, constructor settings, what the refusal names)
    (MoERouterV2, {"gating_function": "sigmoid"}, "sigmoid gating"),
    (MoELinearRouter, {"gating_function": "sigmoid"}, "sigmoid gating"),
    (MoERouterV2, {"score_correction_bias": True}, "per-expert selection bias"),
    (MoELinearRouter, {"bias_gamma": 1e-3}, "per-expert selection bias"),
    (MoERouterV2, {"n_group": 4, "topk_group": 2}, "group-limited choice (n_group=4, topk_group=2)"),
    (MoERouterV2, {"bias": True}, "a router bias b_g"),
    (MoERouterV2, {"gating_function": "sigmoid", "score_correction_bias": True, "n_group": 4, "topk_group": 2},
     "sigmoid gating (gating_function='sigmoid'), a per-expert selection bias (score_correction_bias or bias_gamma), "
     "group-limited choice"),
]


def _configured_router(cls, settings):
    torch.manual_seed(0)
    from olmo_core.nn.moe.router import MoERouterGatingFunction

    settings = {**settings, **({"gating_function": MoERouterGatingFunction(settings["gating_function"])}
                               if "gating_function" in settings else {})}
    return cls(d_model=D_MODEL, num_experts=EXPERTS, top_k=TOP_K, **settings).train()


def _route(router, x):
    return router(x, False) if isinstance(router, MoERouterV2) else router(x)


@pytest.mark.parametrize("cls, settings, named", DEEPSEEK_LIKE)
def test_deepseek_v3_like_routers_are_refused_with_the_reason(cls, settings, named):
    router = _configured_router(cls, settings)
    x, _ = _inputs()
    stock = _route(router, x)
    model = torch.nn.ModuleList([router])
    with pytest.raises(ValueError, match="GatePro does not apply to router '0': " + re.escape(f"{cls.__name__} with ") + ".*"
                       + re.escape(named) + ".*bias-free linear router"):
        patch_olmo_core(model=model, penalty=PENALTY)
    assert not hasattr(router, "_gatepro") and "get_expert_logits" not in router.__dict__  # nothing half-patched
    patch_olmo_core(penalty=PENALTY)  # a class-wide patch cannot see the routers: their first forward refuses
    with pytest.raises(ValueError, match="GatePro does not apply to this router: .*" + re.escape(named)):
        _route(router, x)
    unpatch()
    weights, indices = _route(router, x)[:2]
    assert torch.equal(weights, stock[0]) and torch.equal(indices, stock[1])


def test_topk_softmax_gating_is_the_papers_and_is_patched():
    """Top-k on the logits, softmax over the chosen ones: Eq. 9 of the paper exactly."""
    router = _configured_router(MoERouterV2, {"gating_function": "topk_softmax"})
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
    x, _ = _inputs()
    _, stock_indices, _, _ = router(x, False)
    patch_olmo_core(model=torch.nn.ModuleList([router]), penalty=PENALTY)
    weights, indices, _, _ = router(x, False)
    weight = router.weight.detach().view(EXPERTS, D_MODEL)
    penalised = reference_gatepro(F.linear(x, weight), weight, PENALTY)
    expected_indices = penalised.topk(TOP_K, -1).indices
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(weights, penalised.gather(-1, expected_indices).softmax(-1))
    assert not torch.equal(indices, stock_indices)
