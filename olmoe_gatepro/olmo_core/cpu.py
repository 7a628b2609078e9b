"""Run OLMo-core's MoE layers on CPU tensors: torch index operations in place of its Triton token copies.

OLMo-core's MoE moves tokens to and from the experts with Triton kernels (``olmo_core.kernels.moe``,
which ``olmo_core.ops.moe`` reaches as ``kernels``), and those need CUDA. ``enable_cpu_moe()``
puts a stand-in there: CUDA tensors still go to OLMo-core's kernels, every other tensor to the
functions below, which compute what the kernels compute (float32 products, stored in the input's
dtype; ``tests/integration/test_cpu_moe.py`` compares them with Triton's interpreter running the
kernels themselves). It can be called at any time before the first forward, and again.

Shapes, as in the kernels: ``x`` (rows, d), or (experts, capacity, d) for the binned copies;
``indices`` (tokens * top_k,) integers, the token slots sorted by expert; ``bins`` (experts,)
the running count of slots per expert; ``weights`` (tokens * top_k,) or None. ``bin_ids`` is
taken for the kernels' signature and not needed here.
"""

from types import SimpleNamespace

import torch

__all__ = ["enable_cpu_moe", "gather", "scatter", "scatter_wgrad", "binned_gather", "binned_scatter",
           "binned_scatter_wgrad"]


def _scaled(rows: torch.Tensor, weights: torch.Tensor | None, slots: torch.Tensor) -> torch.Tensor:
    """``rows`` (n, d) in float32, each times ``weights[slots]`` where there are weights."""
    rows = rows.float()
    return rows if weights is None else rows * weights[slots].float()[:, None]


def _sum_top_k(slots: torch.Tensor, top_k: int) -> torch.Tensor:
    """(tokens * top_k, d) -> (tokens, d): each token's ``top_k`` slots summed, in their dtype."""
    tokens = slots.shape[0] // top_k
    return slots.view(tokens, top_k, -1).sum(dim=1) if top_k > 1 else slots.view(tokens, -1)


def gather(x, indices, bin_ids, weights, bins, top_k: int) -> torch.Tensor:
    """(tokens * top_k, d) in ``x``'s dtype: row p is token ``indices[p] // top_k`` of ``x`` (tokens, d), scaled."""
    slots = indices.long()
    return _scaled(x[slots // top_k], weights, slots).to(x.dtype)


def scatter(x, indices, bin_ids, weights, bins, top_k: int) -> torch.Tensor:
    """(tokens, d): row p of ``x`` (tokens * top_k, d) goes to slot ``indices[p]``, scaled; a token sums its slots."""
    slots = indices.long()
    out = x.new_empty((slots.shape[0], x.shape[1]))
    out[slots] = _scaled(x[:slots.shape[0]], weights, slots).to(x.dtype)
    return _sum_top_k(out, top_k)


def scatter_wgrad(x, grad, indices, bin_ids, bins, top_k: int) -> torch.Tensor:
    """(tokens * top_k,) in ``x``'s dtype: slot ``indices[p]`` gets row p of ``x`` dot its token's row of ``grad``."""
    slots = indices.long()
    out = x.new_empty(slots.shape[0])
    out[slots] = (x[:slots.shape[0]].float() * grad[slots // top_k].float()).sum(dim=1).to(x.dtype)
    return out


def _binned(indices, bins, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each slot an expert keeps: its expert, its place in that expert's bin, the slot; those past ``capacity`` drop."""
    bins = bins.long()
    positions = torch.arange(int(bins[-1]), device=indices.device)
    experts = torch.searchsorted(bins, positions, right=True)
    places = positions - torch.cat([bins.new_zeros(1), bins[:-1]])[experts]
    kept = places < capacity
    return experts[kept], places[kept], indices.long()[positions[kept]]


def binned_gather(x, indices, weights, bins, expert_capacity: int, top_k: int) -> torch.Tensor:
    """(experts, expert_capacity, d) in ``x``'s dtype, zero where a bin has fewer tokens: ``gather`` by expert."""
    experts, places, slots = _binned(indices, bins, expert_capacity)
    out = x.new_zeros((bins.shape[0], expert_capacity, x.shape[1]))
    out[experts, places] = _scaled(x[slots // top_k], weights, slots).to(x.dtype)
    return out


def binned_scatter(x, indices, weights, bins, top_k: int) -> torch.Tensor:
    """(tokens, d): the inverse of ``binned_gather`` for ``x`` (experts, capacity, d); a dropped slot adds 0."""
    experts, places, slots = _binned(indices, bins, x.shape[1])
    out = x.new_zeros((indices.shape[0], x.shape[2]))
    out[slots] = _scaled(x[experts, places], weights, slots).to(x.dtype)
    return _sum_top_k(out, top_k)


def binned_scatter_wgrad(x, grad, indices, bins, top_k: int) -> torch.Tensor:
    """(tokens * top_k,) in ``x``'s dtype: ``scatter_wgrad`` for ``x`` (experts, capacity, d); 0 for a dropped slot."""
    experts, places, slots = _binned(indices, bins, x.shape[1])
    out = x.new_zeros(indices.shape[0])
    out[slots] = (x[experts, places].float() * grad[slots // top_k].float()).sum(dim=1).to(x.dtype)
    return out


_ON_CPU = {function.__name__: function for function in
           (gather, scatter, scatter_wgrad, binned_gather, binned_scatter, binned_scatter_wgrad)}


def _token_copy(on_cpu, on_cuda):
    def copy(x, *args):
        return on_cuda(x, *args) if on_cuda is not None and x.is_cuda else on_cpu(x, *args)

    return copy


def enable_cpu_moe() -> None:
    """Let OLMo-core's MoE run on CPU tensors: its token copies of any tensor not on CUDA take the functions here.

    Raises ``ImportError`` if OLMo-core is not installed (the ``[olmo-core]`` extra).
    """
    import olmo_core.ops.moe as ops

    if getattr(ops.kernels, "cpu_moe", False):
        return
    triton_kernels = ops.kernels  # None where triton is not installed
    ops.kernels = SimpleNamespace(cpu_moe=True, **{
        name: _token_copy(on_cpu, getattr(triton_kernels, name, None)) for name, on_cpu in _ON_CPU.items()})
