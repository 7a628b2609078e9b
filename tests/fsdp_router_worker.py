"""Run by test_fsdp_sharded_router under torch.distributed.run with 2 CPU (gloo) processes."""

import sys

import torch
import torch.distributed as dist
from olmo_core.nn.moe.router import MoELinearRouter
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, init_device_mesh

from olmoe_gatepro import competition_partners, patch_olmo_core
from olmoe_gatepro.core.router_state import router_weight_matrix

D_MODEL, EXPERTS, TOP_K, PENALTY = 16, 8, 2, 0.3


def build_router() -> MoELinearRouter:
    torch.manual_seed(0)
    router = MoELinearRouter(d_model=D_MODEL, num_experts=EXPERTS, top_k=TOP_K)
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
    return router.eval()


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    patch_olmo_core(penalty=PENALTY)
    unsharded, sharded = build_router(), build_router()
    fully_shard(sharded, mesh=mesh)
    weight = sharded.weight
    assert isinstance(weight, DTensor) and weight.to_local().numel() == EXPERTS * D_MODEL // 2, weight
    # Outside forward the weight is sharded: the similarity must gather all N rows first.
    full = router_weight_matrix(sharded)
    assert torch.equal(full, unsharded.weight.detach().view(EXPERTS, D_MODEL))
    assert torch.equal(competition_partners(full), competition_partners(unsharded.weight.view(EXPERTS, D_MODEL)))
    x = torch.randn(2, 10, D_MODEL, generator=torch.Generator().manual_seed(100 + rank))
    with torch.no_grad():
        expected, got = unsharded(x), sharded(x)
    assert torch.equal(got[1], expected[1]), f"rank {rank}: indices differ"
    assert torch.equal(got[0], expected[0]), f"rank {rank}: weights differ"
    print(f"rank {rank}: sharded routing equals unsharded", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
