"""Training tokens per second of a reduced OLMoE with and without GatePro, interleaved.

The model has OLMoE-1B-7B's width and expert shape (d = 2048, 64 experts of hidden size
1024, top-8) and fewer layers, and trains with AdamW through transformers' ``OlmoeForCausalLM``
(the path that runs on a CPU). Both models start from the same weights; steps alternate
between them so noise hits both. The last line is ``throughput_ratio=<GatePro / stock>``.

    python benchmarks/train_throughput.py           # 1 layer, 4 x 512 tokens a step (~13 GB)
    python benchmarks/train_throughput.py --quick   # fewer steps, 2 x 512 tokens

OLMo-core's path needs GPU expert kernels; it is not measured by this script.
"""

import argparse
import statistics
import time

import torch

from olmoe_gatepro import patch_transformers
from olmoe_gatepro.pipelines.presets import TinyRunConfig
from olmoe_gatepro.pipelines.tiny_run import build_tiny_olmoe


def build_models(args):
    config = TinyRunConfig(
        d_model=args.d_model, n_layers=args.layers, n_heads=16 if args.d_model % 16 == 0 else 1,
        num_experts=args.experts, top_k=args.top_k, expert_hidden_size=args.expert_hidden,
        sequence_length=args.sequence_length, lb_loss_weight=0.01,
    )
    stock, gatepro = build_tiny_olmoe(config), build_tiny_olmoe(config)
    patch_transformers(model=gatepro, penalty=1e-4)
    return stock, gatepro


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=1)  # 2 with AdamW state needs ~26 GB
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--expert-hidden", type=int, default=1024)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--sequence-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch = 3, 2

    stock, gatepro = build_models(args)
    optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-4) for model in (stock, gatepro)]
    generator = torch.Generator().manual_seed(0)
    tokens_per_step = args.batch * args.sequence_length
    seconds: list[list[float]] = [[], []]
    print(f"OlmoeForCausalLM d={args.d_model} layers={args.layers} experts={args.experts} "
          f"top-{args.top_k} expert_hidden={args.expert_hidden}, {tokens_per_step} tokens a step, "
          f"CPU threads {torch.get_num_threads()}")
    for step in range(args.steps + 1):  # step 0 warms up
        batch = torch.randint(0, 256, (args.batch, args.sequence_length + 1), generator=generator)
        order = (0, 1) if step % 2 == 0 else (1, 0)
        for i in order:
            model, optimizer = (stock, gatepro)[i], optimizers[i]
            started = time.perf_counter()
            loss = model(input_ids=batch[:, :-1], labels=batch[:, 1:].contiguous()).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step:
                seconds[i].append(time.perf_counter() - started)
    stock_tps, gatepro_tps = (tokens_per_step / statistics.median(s) for s in seconds)
    ratio = gatepro_tps / stock_tps
    print(f"stock   {stock_tps:10.1f} tokens/s (median of {args.steps} steps)")
    print(f"gatepro {gatepro_tps:10.1f} tokens/s")
    print(f"throughput_ratio={ratio:.4f}")
    return ratio


if __name__ == "__main__":
    main()
