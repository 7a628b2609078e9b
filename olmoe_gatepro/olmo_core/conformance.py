"""OLMo-core routers to check GatePro on, shared by ``selftest`` and the tests."""

import torch

__all__ = ["LB_LOSS_WEIGHT", "Z_LOSS_WEIGHT", "linear_router"]

LB_LOSS_WEIGHT, Z_LOSS_WEIGHT = 0.01, 0.001


def linear_router(seed: int, *, d_model: int = 16, num_experts: int = 8, top_k: int = 2, router_class=None):
    """A training-mode ``MoELinearRouter`` (or ``router_class``) with load-balancing and z losses, its weight
    (num_experts * d_model,) drawn with std 0.5 from ``seed``: wider than the init, so the penalty moves choices."""
    from olmo_core.nn.moe.router import MoELinearRouter

    torch.manual_seed(seed)
    router = (router_class or MoELinearRouter)(d_model=d_model, num_experts=num_experts, top_k=top_k,
                                               lb_loss_weight=LB_LOSS_WEIGHT, z_loss_weight=Z_LOSS_WEIGHT)
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
    return router.train()
