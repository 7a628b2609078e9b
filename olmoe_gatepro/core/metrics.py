"""Expert-diversity metrics of the GatePro paper (Appendix C) and the routing tally built on the counts.

Similarity metrics take a router weight W of shape (N, d) and use S, the cosine similarity
of its rows, in float64 (they are diagnostics, not on the hot path). Load metrics take the
chosen expert indices of one batch, an int tensor of any shape holding values in [0, N).
The similarity and load metrics return a Python float or int; the co-activation and margin
helpers return tensors (counts to be summed over batches and ranks without a host sync).
"""

import math

import torch
import torch.nn.functional as F


__all__ = [
    "cosine_similarity_matrix",
    "average_cosine_similarity",
    "average_angle_degrees",
    "spectral_entropy",
    "tokens_per_expert",
    "load_metrics",
    "topk_set_changed",
    "router_weight_metrics",
    "partner_hits",
    "partner_coactivation_chance",
    "coactivation_matrix",
    "boundary_margins",
    "RoutingTally",
]


def cosine_similarity_matrix(router_weight: torch.Tensor) -> torch.Tensor:
    """S (Eq. 5): (N, N) float64 cosine similarity of the rows of ``router_weight`` (N, d)."""
    unit_rows = F.normalize(router_weight.detach().double(), dim=-1)
    return unit_rows @ unit_rows.T


def _upper_pairs(similarity: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.triu_indices(*similarity.shape, offset=1, device=similarity.device)
    return similarity[rows, cols]


def average_cosine_similarity(router_weight: torch.Tensor) -> float:
    """Mean of |S_ij| over the pairs i < j."""
    return _upper_pairs(cosine_similarity_matrix(router_weight)).abs().mean().item()


def average_angle_degrees(router_weight: torch.Tensor) -> float:
    """Mean of arccos(S_ij) over the pairs i < j, in degrees (90 means orthogonal)."""
    pairs = _upper_pairs(cosine_similarity_matrix(router_weight)).clamp(-1.0, 1.0)
    return math.degrees(torch.arccos(pairs).mean().item())


def spectral_entropy(router_weight: torch.Tensor, eps: float = 1e-8) -> float:
    """-sum p_i log p_i (natural log) with p_i = (sigma_i + eps) / (sum sigma + N eps), sigma = svd(S)."""
    singular_values = torch.linalg.svdvals(cosine_similarity_matrix(router_weight))
    normalised = (singular_values + eps) / (singular_values.sum() + singular_values.numel() * eps)
    return -(normalised * normalised.log()).sum().item()


def tokens_per_expert(expert_indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(N,) int64: how many (token, slot) assignments each expert received."""
    indices = expert_indices.reshape(-1).long()
    # scatter_add_, not bincount: bincount reads the largest index on the host (a sync on a GPU, a graph break)
    return torch.zeros(num_experts, dtype=torch.int64, device=indices.device).scatter_add_(0, indices, torch.ones_like(indices))


def load_metrics(counts: torch.Tensor) -> dict[str, float | int]:
    """From (N,) tokens per expert: experts with no token, max / mean load (1.0: balanced), entropy of the load."""
    counts = counts.double()
    total = counts.sum()
    load = counts[counts > 0] / total
    return {
        "zero_token_count": int((counts == 0).sum().item()),
        "load_imbalance": (counts.max() / counts.mean()).item() if total else float("nan"),
        "load_entropy": -(load * load.log()).sum().item() if total else float("nan"),
    }


def topk_set_changed(indices: torch.Tensor, other_indices: torch.Tensor) -> torch.Tensor:
    """bool (...,): whether two (..., k) top-k index tensors choose different expert sets."""
    return (indices.sort(dim=-1).values != other_indices.sort(dim=-1).values).any(dim=-1)


def router_weight_metrics(router_weight: torch.Tensor) -> dict[str, float]:
    """The three similarity metrics of one router, by name."""
    return {
        "avg_cosine_similarity": average_cosine_similarity(router_weight),
        "avg_angle_deg": average_angle_degrees(router_weight),
        "spectral_entropy": spectral_entropy(router_weight),
    }


def partner_hits(chosen: torch.Tensor, partners: torch.Tensor) -> torch.Tensor:
    """int64 scalar: how many (token, chosen expert i) have i's partner j*(i) chosen for that token too.

    Args:
        chosen: (..., k) expert indices chosen per token.
        partners: (N,) j*(i) of every expert (``competition_partners(W)``).

    Divided by ``chosen.numel()`` it is the partner co-activation rate, the quantity GatePro
    exists to lower.
    """
    partner_of_chosen = partners[chosen]
    return (partner_of_chosen.unsqueeze(-1) == chosen.unsqueeze(-2)).any(dim=-1).sum()


def partner_coactivation_chance(num_experts: int, top_k: int) -> float:
    """The partner co-activation rate of uniformly random top-k: (k - 1) / (N - 1)."""
    return (top_k - 1) / (num_experts - 1)


def coactivation_matrix(chosen: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(N, N) int64: entry (i, j) counts the tokens that chose both i and j; the diagonal, i's tokens."""
    one_hot = F.one_hot(chosen.reshape(-1, chosen.shape[-1]).long(), num_experts).sum(dim=-2)
    return one_hot.T @ one_hot


def boundary_margins(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """(...,) float32: per token, the k-th largest logit minus the (k+1)-th (+inf when k = N).

    A penalty lambda can change a token's top-k set only when this margin is below lambda.
    """
    if top_k >= logits.shape[-1]:
        return torch.full(logits.shape[:-1], float("inf"), dtype=torch.float32, device=logits.device)
    values = logits.detach().float().topk(top_k + 1, dim=-1).values
    return values[..., top_k - 1] - values[..., top_k]


class RoutingTally:
    """One router's routing, counted over batches: what the training callbacks record and ``inspect`` reports.

    ``counts`` (N + 2 + 2P,) float64 on ``device``: tokens per chosen expert (N), routed tokens,
    partner hits, then for each of the P ``penalties`` the tokens whose top-k set that penalty
    changes and the tokens whose boundary margin is below it. ``add`` only adds tensors (no host
    sync, no graph break); ``counts`` can be all-reduced over ranks before ``rates``.
    """

    def __init__(self, num_experts: int, top_k: int, penalties: tuple[float, ...], device: torch.device | str = "cpu"):
        self.num_experts, self.top_k, self.penalties = num_experts, top_k, tuple(penalties)
        self.counts = torch.zeros(num_experts + 2 + 2 * len(self.penalties), dtype=torch.float64, device=device)

    def add(self, chosen: torch.Tensor, partners: torch.Tensor, margins: torch.Tensor,
            changed: list[torch.Tensor]) -> None:
        """One batch: ``chosen`` (T, k) experts, ``partners`` (N,) the pairs scored, ``margins`` (T,)
        ``boundary_margins``, ``changed`` one (T,) bool per penalty (``topk_set_changed``)."""
        n, counts = self.num_experts, self.counts
        counts[:n] += tokens_per_expert(chosen, n).to(counts.dtype)
        counts[n] += chosen.shape[0]
        counts[n + 1] += partner_hits(chosen, partners).to(counts.dtype)
        for index, (penalty, flipped) in enumerate(zip(self.penalties, changed, strict=True)):
            counts[n + 2 + 2 * index] += flipped.sum().to(counts.dtype)
            counts[n + 3 + 2 * index] += (margins.double() < penalty).sum().to(counts.dtype)  # lambda as given

    def rates(self) -> dict:
        """``load`` (``load_metrics``); ``routed_tokens``; ``partner_coactivation`` (hits over token-expert pairs)
        beside ``partner_coactivation_chance``; ``flip_rates`` and ``margins_below``, one fraction of tokens per penalty."""
        n = self.num_experts
        counted = self.counts.tolist()
        tokens = counted[n]
        share = (lambda count: count / tokens) if tokens else (lambda count: float("nan"))
        return {
            "load": load_metrics(self.counts[:n]),
            "routed_tokens": int(tokens),
            "partner_coactivation": counted[n + 1] / (tokens * self.top_k) if tokens else float("nan"),
            "partner_coactivation_chance": partner_coactivation_chance(n, self.top_k),
            "flip_rates": [share(count) for count in counted[n + 2::2]],
            "margins_below": [share(count) for count in counted[n + 3::2]],
        }
