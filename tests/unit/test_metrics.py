import math

import pytest
import torch

from olmoe_gatepro import gatepro_logits
from olmoe_gatepro.core import metrics
from olmoe_gatepro.core.reference import reference_flip_rate, reference_load, reference_partners


def test_orthogonal_experts():
    weight = torch.eye(4, 6)
    assert metrics.average_cosine_similarity(weight) == pytest.approx(0.0)
    assert metrics.average_angle_degrees(weight) == pytest.approx(90.0)
    # S = I: four equal singular values, entropy log 4.
    assert metrics.spectral_entropy(weight) == pytest.approx(math.log(4))


def test_identical_experts():
    weight = torch.ones(3, 5)
    assert metrics.average_cosine_similarity(weight) == pytest.approx(1.0)
    assert metrics.average_angle_degrees(weight) == pytest.approx(0.0, abs=1e-3)
    # S = all ones: one singular value 3, two zeros; entropy ~ 0 (eps 1e-8).
    assert metrics.spectral_entropy(weight) == pytest.approx(0.0, abs=1e-6)


def test_pairwise_definitions_on_a_hand_case():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])
    # S_01 = 0, S_02 = -1/sqrt2, S_12 = 1/sqrt2
    root_half = 1 / math.sqrt(2)
    assert metrics.average_cosine_similarity(weight) == pytest.approx((0 + 2 * root_half) / 3)
    assert metrics.average_angle_degrees(weight) == pytest.approx((90 + 135 + 45) / 3)
    similarity = metrics.cosine_similarity_matrix(weight)
    sigma = torch.linalg.svdvals(similarity)
    p = (sigma + 1e-8) / (sigma.sum() + 3e-8)
    assert metrics.spectral_entropy(weight) == pytest.approx(-(p * p.log()).sum().item())


def test_load_metrics():
    chosen = torch.tensor([[0, 1], [0, 2], [0, 1]])
    assert metrics.tokens_per_expert(chosen, 5).tolist() == [3, 2, 1, 0, 0]
    got = metrics.load_metrics(metrics.tokens_per_expert(chosen, 5))
    assert got["zero_token_count"] == 2 == reference_load(chosen, 5)[0]
    assert got["load_imbalance"] == pytest.approx(3 / (6 / 5)) == reference_load(chosen, 5)[1]
    assert got["load_entropy"] == pytest.approx(-sum(p * math.log(p) for p in (3 / 6, 2 / 6, 1 / 6)))


def test_flip_rate_counts_tokens_whose_topk_set_changes():
    weight = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    # Token 0: expert 0 loses to 1 and sits 0.05 above expert 2 in the 2nd slot.
    # Token 1: expert 1 loses to 0 by a wide margin: only hard competition drops it.
    logits = torch.tensor([[1.05, 2.0, 1.0, 0.0], [3.0, 2.0, -5.0, -6.0]])
    assert reference_flip_rate(logits, weight, top_k=2, penalty=0.01) == 0.0
    assert reference_flip_rate(logits, weight, top_k=2, penalty=0.1) == 0.5
    hard = gatepro_logits(logits, weight, 0.0, hard=True).topk(2).indices
    assert metrics.topk_set_changed(logits.topk(2).indices, hard).tolist() == [True, True]


def test_flip_rate_agrees_with_gatepro_logits_on_random_data():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 8, generator=generator)
    logits = torch.randn(500, 16, generator=generator)
    rate = reference_flip_rate(logits, weight, top_k=4, penalty=0.3)
    penalised = gatepro_logits(logits, weight, 0.3)
    changed = sum(
        set(logits[t].topk(4).indices.tolist()) != set(penalised[t].topk(4).indices.tolist())
        for t in range(500)
    )
    assert 0 < rate < 1 and rate == pytest.approx(changed / 500)


def test_coactivation_and_margins_on_a_hand_case():
    # Rows 0 and 1 point the same way, as do 2 and 3: partners 0<->1 and 2<->3.
    weight = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    chosen = torch.tensor([[0, 1], [0, 2], [3, 2], [1, 3]])
    # Token by token, chosen experts whose partner is chosen too: 2, 0, 2, 0 of 8.
    assert metrics.partner_hits(chosen, torch.tensor([1, 0, 3, 2])).item() == 4
    assert metrics.partner_coactivation_chance(4, 2) == pytest.approx(1 / 3)
    matrix = metrics.coactivation_matrix(chosen, 4)
    assert matrix.tolist() == [[2, 1, 1, 0], [1, 2, 0, 1], [1, 0, 2, 1], [0, 1, 1, 2]]
    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0], [0.0, 1.0, 1.0, 0.5]])
    assert metrics.boundary_margins(logits, 2).tolist() == [0.5, 0.5]
    assert metrics.boundary_margins(logits, 1).tolist() == [0.5, 0.0]
    assert metrics.boundary_margins(logits, 4).tolist() == [math.inf, math.inf]  # nothing can change
    assert metrics.partner_hits(chosen, torch.tensor(reference_partners(weight))).item() == 4


@pytest.mark.parametrize("enabled", [True, False])
def test_transformers_router_recording_matches_the_plain_loop_reference(enabled):
    from olmoe_gatepro import patch_transformers, unpatch
    from olmoe_gatepro.core.reference import reference_margin_fraction, reference_partner_coactivation
    from olmoe_gatepro.core.router_state import finish_recording, start_recording
    from olmoe_gatepro.pipelines.presets import TinyRunConfig
    from olmoe_gatepro.pipelines.tiny_run import build_tiny_olmoe
    from olmoe_gatepro.transformers.patch import olmoe_routers

    model = build_tiny_olmoe(TinyRunConfig(n_layers=1, num_experts=8, top_k=3, d_model=32, n_heads=2))
    patch_transformers(model=model, penalty=0.05, enabled=enabled)
    try:
        router = olmoe_routers(model)[0]
        hidden = torch.randn(50, 32, generator=torch.Generator().manual_seed(0))
        start_recording(router)
        with torch.no_grad():
            chosen = router(hidden)[2]
        got = finish_recording(router)
    finally:
        unpatch()
    weight = router.weight.detach()
    logits = torch.nn.functional.linear(hidden, weight)
    assert got["routed_tokens"] == 50
    assert got["partner_coactivation"] == pytest.approx(reference_partner_coactivation(chosen, weight))
    assert got["partner_coactivation_chance"] == pytest.approx(2 / 7)
    assert got["margin_below_penalty"] == pytest.approx(reference_margin_fraction(logits, 3, 0.05))
    assert got["flip_rate"] == pytest.approx(reference_flip_rate(logits, weight, 3, 0.05))
    assert (got["zero_token_count"], got["load_imbalance"]) == pytest.approx(reference_load(chosen, 8))
    assert 0 < got["margin_below_penalty"] < 1 and got["partner_coactivation"] > 0 and got["flip_rate"] > 0


def test_routing_tally_at_several_penalties_matches_the_plain_loop_references_and_sums_over_ranks():
    """One ``RoutingTally`` (what the callbacks record and inspect reports) at two lambdas, fed in two batches,
    against the plain-loop references; two tallies' counts added (an all-reduce) give the one tally's rates."""
    from olmoe_gatepro.core.gatepro import competition_partners
    from olmoe_gatepro.core.reference import reference_margin_fraction, reference_partner_coactivation

    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(8, 16, generator=generator)
    logits = torch.randn(60, 16, generator=generator) @ weight.T
    penalties, top_k = (0.5, 2.0), 3  # the logits spread about 4 wide
    partners = competition_partners(weight)
    chosen = logits.topk(top_k, dim=-1).indices

    def feed(tally, rows):
        stock = logits[rows].topk(top_k, dim=-1).indices
        changed = [metrics.topk_set_changed(stock, gatepro_logits(logits[rows], weight, p).topk(top_k, dim=-1).indices)
                   for p in penalties]
        tally.add(chosen[rows], partners, metrics.boundary_margins(logits[rows], top_k), changed)

    whole, ranks = metrics.RoutingTally(8, top_k, penalties), [metrics.RoutingTally(8, top_k, penalties) for _ in range(2)]
    for rows, rank in ((slice(0, 25), ranks[0]), (slice(25, 60), ranks[1])):
        feed(whole, rows)
        feed(rank, rows)
    got = whole.rates()
    assert got["routed_tokens"] == 60
    assert got["partner_coactivation"] == pytest.approx(reference_partner_coactivation(chosen, weight))
    assert (got["load"]["zero_token_count"], got["load"]["load_imbalance"]) == pytest.approx(reference_load(chosen, 8))
    assert got["flip_rates"] == pytest.approx([reference_flip_rate(logits, weight, top_k, p) for p in penalties])
    assert got["margins_below"] == pytest.approx([reference_margin_fraction(logits, top_k, p) for p in penalties])
    assert got["flip_rates"][0] < got["flip_rates"][1] and 0 < got["margins_below"][0] < got["margins_below"][1]
    ranks[0].counts += ranks[1].counts
    assert ranks[0].rates() == got
