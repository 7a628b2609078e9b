"""OLMo-core routers and runs to check GatePro on, shared by ``selftest`` and the tests."""

import os
import subprocess
import time

import torch

__all__ = ["LB_LOSS_WEIGHT", "Z_LOSS_WEIGHT", "linear_router", "timed_router_pair", "forward_backward",
           "kill_after_checkpoint"]

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


def timed_router_pair(d_model: int, num_experts: int, top_k: int, device: torch.device, penalty: float = 1e-4):
    """(stock, gatepro): training-mode ``MoELinearRouter``s with the same default-initialised weights (seed 0), the
    second patched (this instance only) at ``penalty``; what ``selftest`` and the overhead benchmark time."""
    from olmo_core.nn.moe.router import MoELinearRouter

    from olmoe_gatepro.olmo_core.patch import patch_olmo_core

    routers = []
    for _ in range(2):
        torch.manual_seed(0)
        routers.append(MoELinearRouter(d_model=d_model, num_experts=num_experts, top_k=top_k,
                                       lb_loss_weight=LB_LOSS_WEIGHT, z_loss_weight=Z_LOSS_WEIGHT).to(device).train())
    patch_olmo_core(model=torch.nn.ModuleList([routers[1]]), penalty=penalty)
    return routers[0], routers[1]


def forward_backward(router, x: torch.Tensor) -> None:
    """Forward and backward of ``router`` on ``x`` (B, S, d); the summed weights stand in for the experts."""
    weights, _, _, aux_loss = router(x)
    (weights.sum() + aux_loss).backward()


def kill_after_checkpoint(command: list[str], save_folder: str, step: int, timeout: float = 900) -> None:
    """Start the training ``command`` and SIGKILL it once its checkpoint of ``step`` in ``save_folder`` is
    complete, as a pre-emption would; a RuntimeError if it ends before, or ``timeout`` seconds pass."""
    from olmo_core.train.checkpoint import Checkpointer

    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not Checkpointer.dir_is_checkpoint(os.path.join(save_folder, f"step{step}")):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(command[-2:])}: the run ended or ran out of time before its "
                                   f"step-{step} checkpoint")
            time.sleep(0.05)
    finally:
        process.kill()
        process.wait()
