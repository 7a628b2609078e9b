"""A plain-loop transcription of the paper's Algorithm 1: the yardstick of the tests and of ``selftest``.

Deliberately slow and independent of ``gatepro.py``: float64 loops for the partners, one token
and one expert at a time for the penalty. For small inputs only.
"""

import math

import torch

# A bfloat16 near-tie that only a penalty applied in float32 decides (near 1.0, bf16 values are 2^-7
# apart, so 1 - 1e-4 rounds back to 1): experts 0 and 2 tie exactly for the second slot behind
# expert 1. In the first case expert 0's partner is expert 1, in the second expert 2's, so at
# lambda = 1e-4 expert 0, then expert 2, loses. Each case: (router weight (4, 2), the top-2 set chosen).
BF16_NEAR_TIE_LOGITS = ((1.0078125, 1.015625, 1.0078125, 0.5),)  # (1, 4)
BF16_NEAR_TIE_CASES = (
    (((1.0, 0.0), (0.99, 0.1), (0.0, 1.0), (0.1, 0.99)), {1, 2}),
    (((0.1, 0.99), (0.99, 0.1), (1.0, 0.0), (0.0, 1.0)), {0, 1}),
)


def reference_partners(router_weight: torch.Tensor) -> list[int]:
    """j*(i) = argmax_{j != i} S_ij (Eq. 5-6), first index on ties, in float64 loops."""
    rows = router_weight.double().tolist()
    norms = [math.sqrt(sum(x * x for x in row)) or 1e-300 for row in rows]
    partners = []
    for i, row_i in enumerate(rows):
        best_j, best = None, -math.inf
        for j, row_j in enumerate(rows):
            if j == i:
                continue
            similarity = sum(a * b for a, b in zip(row_i, row_j)) / (norms[i] * norms[j])
            if similarity > best:
                best_j, best = j, similarity
        partners.append(best_j)
    return partners


def reference_gatepro(logits: torch.Tensor, router_weight: torch.Tensor, penalty: float) -> torch.Tensor:
    """Eq. 7-8 token by token: a loser (strictly lower than its partner) loses ``penalty``, in float32."""
    partners = reference_partners(router_weight)
    flat = logits.float().reshape(-1, logits.shape[-1])
    out = flat.clone()
    for t in range(flat.shape[0]):
        for i, j in enumerate(partners):
            if flat[t, i] < flat[t, j]:
                out[t, i] = flat[t, i] - torch.tensor(penalty, dtype=torch.float32)
    return out.reshape(logits.shape)


def reference_partner_coactivation(chosen: torch.Tensor, router_weight: torch.Tensor) -> float:
    """Over every token and chosen expert i: the fraction with j*(i) chosen for the token too."""
    partners = reference_partners(router_weight)
    rows = chosen.reshape(-1, chosen.shape[-1]).tolist()
    hits = sum(partners[i] in row for row in rows for i in row)
    return hits / sum(len(row) for row in rows)


def reference_margin_fraction(logits: torch.Tensor, top_k: int, penalty: float) -> float:
    """Fraction of tokens whose k-th and (k+1)-th largest logits (float32) differ by less than ``penalty``."""
    rows = logits.float().reshape(-1, logits.shape[-1])
    below = 0
    for row in rows:
        ordered = sorted(row.tolist(), reverse=True)
        below += (torch.tensor(ordered[top_k - 1]) - torch.tensor(ordered[top_k])).item() < penalty
    return below / rows.shape[0]


def reference_load(chosen: torch.Tensor, num_experts: int) -> tuple[int, float]:
    """(experts that received no token, max over mean of tokens per expert), counted in a loop."""
    counts = [0] * num_experts
    for expert in chosen.reshape(-1).tolist():
        counts[expert] += 1
    return sum(count == 0 for count in counts), max(counts) / (sum(counts) / num_experts)


def reference_flip_rate(logits: torch.Tensor, router_weight: torch.Tensor, top_k: int, penalty: float) -> float:
    """Fraction of tokens whose top-k expert set changes under ``reference_gatepro`` (sets compared as sets)."""
    plain, penalised = logits.float().reshape(-1, logits.shape[-1]), reference_gatepro(logits, router_weight, penalty)
    penalised = penalised.reshape(-1, logits.shape[-1])
    changed = sum(set(a.topk(top_k).indices.tolist()) != set(b.topk(top_k).indices.tolist())
                  for a, b in zip(plain, penalised))
    return changed / plain.shape[0]
