"""What GatePro costs in OLMo-core's router: forward + backward, stock vs GatePro, interleaved.

The stock router is OLMo-core's ``MoELinearRouter`` in training mode with OLMoE's auxiliary
losses (load balancing 0.01, z-loss 0.001); the GatePro router is the same module patched by
``olmoe_gatepro.patch_olmo_core(model=...)``. Each repetition times both, in alternating order,
so machine noise hits both; the table gives medians and the ratio GatePro / stock. The last
line is ``overhead_ratio=<ratio at d=2048, N=64, 16K tokens, best mode on this device>``.

    python benchmarks/router_overhead.py            # the full grid (minutes on a CPU)
    python benchmarks/router_overhead.py --quick    # under a minute on a CPU
"""

import argparse
import functools
import statistics
import sys
import time

import torch

from olmoe_gatepro import competition_partners
from olmoe_gatepro.olmo_core.conformance import forward_backward, timed_router_pair
from olmoe_gatepro.pipelines.selftest import interleaved_seconds

HEADLINE = (2048, 64, 16384)  # d_model, experts, tokens


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_partner_table(weight: torch.Tensor, device: torch.device, repeats: int) -> float:
    competition_partners(weight)
    _sync(device)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        competition_partners(weight)
        _sync(device)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def run(args) -> float | None:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    modes = ["eager"] + ([] if args.no_compile else ["compile"])
    print(f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, input dtype {dtype}")
    print(f"{'mode':<8}{'d':>6}{'N':>5}{'tokens':>8}{'stock ms':>11}{'gatepro ms':>12}{'ratio':>8}{'partners ms':>13}")
    results = {}
    for num_experts in args.experts:
        stock, gatepro = timed_router_pair(args.d_model, num_experts, args.top_k, device)
        partner_ms = 1e3 * time_partner_table(stock.weight.detach().view(num_experts, -1), device, args.repeats)
        for mode in modes:
            for tokens in args.tokens:
                steps = [functools.partial(forward_backward, router) for router in (stock, gatepro)]
                if mode == "compile":
                    # Both steps share one code object: a fresh Dynamo cache per shape keeps
                    # their compiled graphs from competing for its recompile limit.
                    torch._dynamo.reset()
                    steps = [torch.compile(step, dynamic=False) for step in steps]
                generator = torch.Generator(device=device).manual_seed(tokens)
                x = torch.randn(1, tokens, args.d_model, generator=generator, device=device, dtype=dtype)
                x.requires_grad_(True)
                calls = [lambda step=step: (setattr(x, "grad", None), step(x)) for step in steps]
                stock_s, gatepro_s = interleaved_seconds(calls, device, args.repeats, args.warmup)
                stock_ms, gatepro_ms = 1e3 * statistics.median(stock_s), 1e3 * statistics.median(gatepro_s)
                ratio = gatepro_ms / stock_ms
                results[(mode, args.d_model, num_experts, tokens)] = ratio
                print(f"{mode:<8}{args.d_model:>6}{num_experts:>5}{tokens:>8}{stock_ms:>11.3f}"
                      f"{gatepro_ms:>12.3f}{ratio:>8.3f}{partner_ms:>13.3f}", flush=True)
    headline = [ratio for (mode, *shape), ratio in results.items() if tuple(shape) == HEADLINE]
    if headline:
        print(f"overhead_ratio={min(headline):.4f}")
        return min(headline)
    print("overhead_ratio=n/a (the headline shape d=2048, N=64, 16K tokens was not measured)")
    return None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N=64, 4K and 16K tokens, 3 repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--experts", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="eager mode only")
    args = parser.parse_args(argv)
    if args.quick:
        args.experts = [e for e in args.experts if e == 64] or args.experts[:1]
        args.tokens = [t for t in args.tokens if t in (4096, 16384)] or args.tokens[:2]
        args.repeats, args.warmup = 3, 1
    return args


if __name__ == "__main__":
    run(parse_args())
    sys.exit(0)
