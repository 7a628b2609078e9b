import math

import pytest
import torch
import torch.nn.functional as F

from olmoe_gatepro import competition_partners, gatepro_logits
from olmoe_gatepro.core.conformance import compile_failure, math_mismatches
from olmoe_gatepro.core.conformance import random_case as _random_case
from olmoe_gatepro.core.reference import reference_gatepro, reference_partners


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("num_experts", [2, 3, 8, 64])
def test_matches_plain_loop_reference(seed, num_experts):
    logits, weight = _random_case(seed, num_experts=num_experts)
    assert competition_partners(weight).tolist() == reference_partners(weight)
    out = gatepro_logits(logits, weight, penalty=0.3)
    torch.testing.assert_close(out, reference_gatepro(logits, weight, 0.3), rtol=0, atol=0)
    assert out.dtype == torch.float32


def test_three_dimensional_input_is_tokenwise():
    logits, weight = _random_case(1, tokens=24)
    batched = logits.reshape(2, 3, 4, 8)
    out = gatepro_logits(batched, weight, penalty=0.1)
    assert out.shape == batched.shape
    torch.testing.assert_close(out.reshape(24, 8), reference_gatepro(logits, weight, 0.1), rtol=0, atol=0)


def test_exact_logit_ties_are_both_winners():
    weight = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])  # 0 and 1 are mutual partners
    logits = torch.tensor([[2.0, 2.0, -1.0], [1.0, 3.0, 5.0]])
    out = gatepro_logits(logits, weight, penalty=0.5)
    # Row 0: 0 and 1 tie, so neither loses; 2 (partner 1) is lower and loses.
    # Row 1: 0 < 1 loses; 1's partner is 0, so 1 wins; 2 > its partner 1 and wins.
    assert out.tolist() == [[2.0, 2.0, -1.5], [0.5, 3.0, 5.0]]
    assert out.tolist() == reference_gatepro(logits, weight, 0.5).tolist()


def test_two_experts_only_the_lower_loses():
    weight = torch.tensor([[1.0, 2.0], [-3.0, 0.5]])
    logits = torch.tensor([[0.1, 0.2], [0.7, -0.7], [0.4, 0.4]])
    assert competition_partners(weight).tolist() == [1, 0]
    expected = torch.tensor([[0.1 - 1.0, 0.2], [0.7, -0.7 - 1.0], [0.4, 0.4]])
    torch.testing.assert_close(gatepro_logits(logits, weight, penalty=1.0), expected)


def test_non_mutual_partners():
    # 0 -> 1 and 1 -> 2 (1 is closer to 2 than to 0), 2 -> 1: partner is not symmetric.
    weight = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    partners = competition_partners(weight).tolist()
    assert partners == reference_partners(weight)
    assert partners[:3] == [1, 2, 1]
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    # 0 beats 1; 1 beats 2; 2 loses to 1; 3's partner is 0 (first of the ties at 0), loses.
    out = gatepro_logits(logits, weight, penalty=0.25)
    assert out.tolist() == reference_gatepro(logits, weight, 0.25).tolist()
    assert out.tolist() == [[3.0, 2.0, 0.75, -0.25]]


def test_duplicate_rows_tie_to_lowest_index():
    weight = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert competition_partners(weight).tolist() == [1, 0, 0, 0] == reference_partners(weight)


def test_every_dtype_and_the_bf16_near_tie_conform_to_the_reference():
    """selftest's math check (core/conformance.py): float32 out, equal to the reference bit for bit in
    float32, bfloat16 and float16, the near-tie decided at lambda 1e-4; and it reports a wrong reference."""
    def doubled(logits, weight, penalty):
        return reference_gatepro(logits, weight, 2 * penalty)

    assert math_mismatches("cpu") == []
    assert math_mismatches("cpu", doubled) == ["float32", "bfloat16", "float16"]
    assert math_mismatches("cpu", lambda logits, weight, penalty: logits.float())[-1] == "bf16 near-tie"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_keep_a_penalty_that_would_round_away(dtype):
    logits, weight = _random_case(7, dtype=dtype)
    expected = reference_gatepro(logits.float(), weight.float(), 1e-4)
    torch.testing.assert_close(gatepro_logits(logits, weight, penalty=1e-4), expected, rtol=0, atol=0)
    assert (expected != logits.float()).any()  # the 1e-4 penalty survives: it would round away in bf16/fp16


def test_bf16_near_tie_penalty_changes_the_chosen_expert():
    """The near-tie selftest checks too (core/reference.py): lambda = 1e-4 decides an exact bf16 tie."""
    from olmoe_gatepro.core.reference import BF16_NEAR_TIE_CASES, BF16_NEAR_TIE_LOGITS

    logits = torch.tensor(BF16_NEAR_TIE_LOGITS, dtype=torch.bfloat16)
    penalty_in_bf16 = logits - torch.tensor([[1e-4, 0, 0, 0]], dtype=torch.bfloat16)
    assert torch.equal(penalty_in_bf16, logits)  # the trap: computed in bf16, lambda vanishes
    stock = set(logits.float().topk(2, dim=-1).indices[0].tolist())
    assert stock in ({0, 1}, {1, 2})
    chosen = [set(gatepro_logits(logits, torch.tensor(weight, dtype=torch.bfloat16), 1e-4).topk(2, dim=-1).indices[0].tolist())
              for weight, _ in BF16_NEAR_TIE_CASES]
    assert chosen == [expected for _, expected in BF16_NEAR_TIE_CASES] == [{1, 2}, {0, 1}]
    assert stock in chosen and any(choice != stock for choice in chosen)  # whichever way topk breaks ties, one changed


def test_gradient_is_identity_and_matches_stock_router():
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 16, generator=generator, requires_grad=True)
    weight = torch.randn(8, 16, generator=generator, requires_grad=True)
    upstream = torch.randn(40, 8, generator=generator)

    (F.linear(hidden, weight).float() * upstream).sum().backward()
    stock = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None

    penalised = gatepro_logits(F.linear(hidden, weight), weight, penalty=0.5)
    assert (penalised != F.linear(hidden, weight)).any()
    (penalised * upstream).sum().backward()
    torch.testing.assert_close(hidden.grad, stock[0], rtol=0, atol=0)
    torch.testing.assert_close(weight.grad, stock[1], rtol=0, atol=0)


def test_stock_router_gradients_through_softmax_topk_match_when_routing_is_unchanged():
    # With a penalty too small to move any choice, the patched path differs from stock only
    # by the constant; gradients agree to float32 rounding.
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(64, 16, generator=generator)
    weight = torch.randn(8, 16, generator=generator, requires_grad=True)

    def routed_weight_sum(logits):
        top = F.softmax(logits.float(), dim=-1).topk(2, dim=-1)
        return top.values.sum(), top.indices

    loss, stock_idx = routed_weight_sum(F.linear(hidden, weight))
    (stock_grad,) = torch.autograd.grad(loss, weight)
    loss, gatepro_idx = routed_weight_sum(gatepro_logits(F.linear(hidden, weight), weight, 1e-6))
    (gatepro_grad,) = torch.autograd.grad(loss, weight)
    assert torch.equal(stock_idx, gatepro_idx)
    torch.testing.assert_close(gatepro_grad, stock_grad, rtol=1e-4, atol=1e-5)


def test_partner_table_sends_no_gradient_to_the_weight():
    logits, weight = _random_case(5)
    weight.requires_grad_(True)
    out = gatepro_logits(logits, weight, penalty=0.1)
    assert not out.requires_grad


def test_precomputed_partners_give_the_same_result():
    logits, weight = _random_case(6)
    partners = competition_partners(weight)
    torch.testing.assert_close(
        gatepro_logits(logits, None, 0.2, partners=partners), gatepro_logits(logits, weight, 0.2)
    )


def test_top_m_competitors_lose_to_any_of_the_m_most_similar():
    logits, weight = _random_case(8, num_experts=10)
    partners = competition_partners(weight, num_competitors=3)
    assert partners.shape == (10, 3)
    similarity = F.normalize(weight, dim=-1) @ F.normalize(weight, dim=-1).T
    for i in range(10):
        others = sorted((j for j in range(10) if j != i), key=lambda j: -similarity[i, j].item())
        assert partners[i].tolist() == others[:3]
    out = gatepro_logits(logits, weight, 0.5, num_competitors=3)
    for t in range(logits.shape[0]):
        for i in range(10):
            lost = any(logits[t, i] < logits[t, j] for j in partners[i].tolist())
            assert out[t, i].item() == pytest.approx(logits[t, i].item() - (0.5 if lost else 0.0))
    one = gatepro_logits(logits, weight, 0.5, num_competitors=1)
    assert torch.equal(one, gatepro_logits(logits, weight, 0.5))


def test_hard_competition_never_chooses_a_loser():
    logits, weight = _random_case(9)
    out = gatepro_logits(logits, weight, hard=True)
    soft = gatepro_logits(logits, weight, penalty=1.0)
    losers = soft != logits
    assert torch.isinf(out[losers]).all() and (out[~losers] == logits[~losers]).all()
    chosen = F.softmax(out, dim=-1).topk(2, dim=-1).indices
    assert not losers.gather(-1, chosen).any()


def test_zero_penalty_is_the_identity():
    logits, weight = _random_case(10)
    assert torch.equal(gatepro_logits(logits, weight, penalty=0.0), logits)


@pytest.mark.parametrize(
    "logits_shape, weight_shape, penalty, message",
    [
        ((4, 1), (1, 8), 1e-4, "at least 2 experts"),
        ((4, 8), (7, 8), 1e-4, "router_weight has 7 rows"),
        ((4, 8), (8,), 1e-4, "shape \\(N, d\\)"),
        ((4, 8), (8, 16), -1e-4, "-0.0001"),
        ((4, 8), (8, 16), math.inf, "inf"),
        ((4, 8), (8, 16), math.nan, "nan"),
    ],
)
def test_bad_input_names_the_value(logits_shape, weight_shape, penalty, message):
    with pytest.raises(ValueError, match=message):
        gatepro_logits(torch.zeros(logits_shape), torch.ones(weight_shape), penalty)


def test_bad_partner_inputs():
    with pytest.raises(ValueError, match="N=1 rows"):
        competition_partners(torch.ones(1, 4))
    with pytest.raises(ValueError, match="num_competitors .* got 8"):
        competition_partners(torch.randn(8, 4), num_competitors=8)
    with pytest.raises(TypeError, match="penalty \\(lambda\\) must be a Python number"):
        gatepro_logits(torch.zeros(2, 4), torch.randn(4, 3), torch.tensor(1e-4))


def test_compiles_without_graph_breaks():
    """One graph, and selftest's compile check (core/conformance.py) passes (aot_eager: no C++ compiler needed)."""
    logits, weight = _random_case(11, tokens=16)
    explanation = torch._dynamo.explain(gatepro_logits)(logits, weight, 1e-4)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    assert compile_failure("cpu", backend="aot_eager") is None
