"""The GatePro math (arXiv 2510.13079, Eq. 5-8 and Algorithm 1), in plain torch.

For a router weight W of shape (N, d), S is the cosine similarity of W's rows (Eq. 5) and
expert i's competition partner is j*(i) = argmax_{j != i} S[i, j] (Eq. 6). For every token,
expert i loses when its logit is strictly lower than its partner's (Eq. 7, ties are both
winners), and a loser's logit drops by the constant ``penalty`` (lambda, Eq. 8).

Everything is computed in float32, whatever the input dtype: lambda = 1e-4 is below bf16's
spacing near 1.0 (2^-7) and would vanish there. The penalty is a constant with no gradient, so
gradients reach the logits exactly as if they were unpenalised; the partner table is computed
from a detached copy of W and sends no gradient to it. No function here reads a tensor value
on the host, so none of them syncs a GPU or breaks a ``torch.compile`` graph.

Two options go beyond the paper; both are off by default:

- ``num_competitors = m > 1``: each expert competes against its m most similar experts and
  loses when it is strictly lower than any of them (the paper's open question 2). The penalty
  is still applied once.
- ``hard = True``: a loser's logit becomes -inf, so it is never chosen and gets no mixture
  weight (the limit lambda -> infinity, which ``penalty`` itself rejects as non-finite).
"""

import torch
import torch.nn.functional as F

from olmoe_gatepro.core.checks import check_bool, check_int, check_number, type_name

__all__ = ["competition_partners", "gatepro_logits", "penalise_losers", "check_tensor"]


def check_tensor(where: str, value, shape: str, floating: bool = True) -> torch.Tensor:
    """``value`` if it is a tensor of a floating dtype (``floating``) or an int64/int32 one; else a TypeError.

    Reads only static properties: no host sync, no graph break. ``shape`` describes the
    expected shape in the message, e.g. ``"(N, d)"``.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where} must be a torch.Tensor of shape {shape}; got {type_name(value)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{where} must be a floating-point tensor of shape {shape}; got dtype {value.dtype}")
    if not floating and value.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{where} must be an int64 (or int32) tensor of shape {shape}; got dtype {value.dtype}")
    return value


def _check_router_weight(router_weight, num_experts: int | None = None) -> None:
    check_tensor("router_weight", router_weight, "(N, d)")
    if router_weight.dim() != 2:
        raise ValueError(
            f"router_weight must have shape (N, d); got shape {tuple(router_weight.shape)}"
        )
    if router_weight.shape[0] < 2:
        raise ValueError(
            f"GatePro needs at least 2 experts; router_weight has N={router_weight.shape[0]} rows"
        )
    if num_experts is not None and router_weight.shape[0] != num_experts:
        raise ValueError(
            f"router_weight has {router_weight.shape[0]} rows (experts) but the logits' last "
            f"dimension is {num_experts}; router_weight shape {tuple(router_weight.shape)}"
        )


def _check_num_competitors(num_competitors, num_experts: int) -> None:
    check_int(f"num_competitors (N = {num_experts} experts)", num_competitors, 1, num_experts - 1)


def competition_partners(router_weight: torch.Tensor, num_competitors: int = 1) -> torch.Tensor:
    """Each expert's most similar other expert(s) by cosine similarity of router rows.

    Args:
        router_weight: (N, d), any float dtype; used detached, in float32.
        num_competitors: m, how many partners each expert gets.

    Returns:
        int64 tensor of shape (N,) holding j*(i) when m = 1 (on ties, the lowest index),
        else (N, m), the m most similar experts in decreasing similarity.
    """
    _check_router_weight(router_weight)
    num_experts = router_weight.shape[0]
    _check_num_competitors(num_competitors, num_experts)
    unit_rows = F.normalize(router_weight.detach().float(), dim=-1)
    similarity = unit_rows @ unit_rows.T
    self_mask = torch.eye(num_experts, dtype=torch.bool, device=similarity.device)
    similarity = similarity.masked_fill(self_mask, float("-inf"))
    if num_competitors == 1:
        return similarity.argmax(dim=-1)
    return similarity.topk(num_competitors, dim=-1).indices


def gatepro_logits(
    logits: torch.Tensor,
    router_weight: torch.Tensor | None,
    penalty: float = 1e-4,
    *,
    partners: torch.Tensor | None = None,
    num_competitors: int = 1,
    hard: bool = False,
) -> torch.Tensor:
    """Penalise, per token, every expert that loses to its competition partner(s).

    Args:
        logits: (..., N) router logits, any float dtype.
        router_weight: (N, d) router weight the partners come from; may be None when
            ``partners`` is given.
        penalty: lambda >= 0, a finite Python number (not a tensor).
        partners: optional precomputed ``competition_partners(router_weight, m)``, (N,) or (N, m),
            to reuse one partner table across calls; its values are checked to lie in [0, N), which
            reads it on the host (a GPU sync: a training loop uses ``penalise_losers``).
        num_competitors: m, used when ``partners`` is None.
        hard: a loser's logit becomes -inf instead of dropping by ``penalty``.

    Returns:
        float32 tensor of the shape of ``logits``: the penalised logits. Its gradient with
        respect to ``logits`` is the identity.
    """
    check_tensor("logits", logits, "(..., N)")
    if logits.dim() == 0:
        raise ValueError("logits must have shape (..., N), one logit per expert; got a 0-dim tensor")
    num_experts = logits.shape[-1]
    if num_experts < 2:
        raise ValueError(
            f"GatePro needs at least 2 experts; logits of shape {tuple(logits.shape)} have N={num_experts}"
        )
    penalty = check_number("penalty (lambda)", penalty, minimum=0)
    check_bool("hard", hard)
    if router_weight is not None:
        _check_router_weight(router_weight, num_experts)
    if partners is None:
        if router_weight is None:
            raise ValueError("gatepro_logits needs router_weight or partners; both are None")
        partners = competition_partners(router_weight, num_competitors)
    else:
        _check_partners(partners, num_experts, logits.device)
    return penalise_losers(logits, partners, penalty, hard=hard)


def _check_partners(partners, num_experts: int, device: torch.device) -> None:
    """A caller's partner table: shape, dtype and device, and (reading it on the host) its values."""
    check_tensor("partners", partners, f"(N,) or (N, m) with N={num_experts}", floating=False)
    if partners.dim() not in (1, 2) or partners.shape[0] != num_experts:
        raise ValueError(
            f"partners must have shape (N,) or (N, m) with N={num_experts}; got {tuple(partners.shape)}"
        )
    if partners.device != device:
        raise ValueError(f"partners are on {partners.device} but the logits on {device}")
    if partners.numel() and not bool(((partners >= 0) & (partners < num_experts)).all()):
        bad = partners[(partners < 0) | (partners >= num_experts)][0].item()
        raise ValueError(f"partners must hold expert indices in [0, {num_experts - 1}]; got {bad}")


def penalise_losers(logits: torch.Tensor, partners: torch.Tensor, penalty: float, *, hard: bool = False) -> torch.Tensor:
    """Eq. 7-8 without any checks, for callers whose inputs are already known good (the routers).

    Args:
        logits: (..., N) float logits.
        partners: (N,) or (N, m) int64 table from ``competition_partners``, on the logits' device.
        penalty: lambda, a finite float >= 0; hard: a loser's logit becomes -inf.

    Returns:
        float32 tensor of the shape of ``logits``.
    """
    logits = logits.float()
    scores = logits.detach()
    if partners.dim() == 1:
        lost = scores < scores.index_select(-1, partners)
    else:
        rivals = scores.index_select(-1, partners.reshape(-1)).unflatten(-1, tuple(partners.shape))
        lost = (scores.unsqueeze(-1) < rivals).any(dim=-1)
    if hard:
        return logits + torch.where(lost, float("-inf"), 0.0)
    return logits - lost.to(torch.float32) * penalty
