"""What a training run costs, known before it is launched: FLOPs, GPU-hours and wall time.

Training FLOPs per token are counted as OLMo-core's speed monitor counts them for its MFU
(``Transformer.num_flops_per_token``), so a predicted MFU and the one the run reports agree:

    F = 6 * N + 6 * n_layers * d_model * (T + 1)

``N`` is the number of parameters one token's forward pass multiplies with: per layer the
attention projections (4 d^2) and q/k norms (2 d), the router (d x experts) and the ``top_k``
chosen experts (top_k x 3 x d x expert_hidden), plus the output layer (embedding_size x d)
and its norm. The input embedding is a lookup (no FLOPs), so ``N`` is the active parameter
count less the embedding table. The second term is causal attention: ``12 x d`` FLOPs per
attended (query, key) pair, T (T + 1) / 2 pairs per sequence of T tokens. The run trains
``max_steps`` whole steps, so ``tokens = max_steps x tokens_per_step`` (a little more than
``max_tokens`` when it is not a multiple).

From the FLOPs: ``GPU-seconds = F x tokens / (peak x MFU)`` at the GPU's dense bf16 peak and an
assumed MFU, or ``GPU-seconds = tokens / TPS`` with a throughput TPS (tokens per second per
GPU) measured on the cluster by a short run of the same config (OLMo-core's
``throughput/device/TPS`` in its metrics file); wall time is GPU-seconds over the number of
GPUs. Neither includes in-loop evaluation, checkpoint saving, start-up or queueing.
"""

import dataclasses
import json
import os
import statistics
from dataclasses import dataclass

from olmoe_gatepro.olmo_core.run_config import RUN_CONFIG_FILE, ModelConfig, RunConfig

__all__ = ["GPU_PEAK_FLOPS", "DEFAULT_GPU", "DEFAULT_MFU", "Throughput", "RunCost", "total_params", "active_params",
           "matmul_params", "flops_per_token", "run_cost", "measured_throughput", "format_cost", "cost_lines"]

# Dense (not sparse) bf16 tensor-core peaks, FLOP/s, from NVIDIA's data sheets; OLMo-core's speed
# monitor uses the same figures for the A100, H100 SXM and H100 PCIe.
GPU_PEAK_FLOPS = {
    "a100": 312e12,
    "h100": 989.5e12,  # SXM
    "h100-pcie": 756.5e12,
    "h200": 989.5e12,  # the H100 SXM's compute with more memory
    "b200": 2250e12,
}
DEFAULT_GPU = "h100"
# An assumption, not a measurement: MoE training reaches less MFU than dense (token routing and
# all-to-all); replace it with a measured throughput (``Throughput.measured_in``) when there is one.
DEFAULT_MFU = 0.25
THROUGHPUT_METRIC = "throughput/device/TPS"


def _layer_params(model: ModelConfig, experts: int) -> int:
    """Parameters of one block with ``experts`` experts: attention (+ q/k norms), two norms, router, experts."""
    d = model.d_model
    attention = 4 * d * d + (2 * d if model.qk_norm else 0)
    return attention + 2 * d + d * model.num_experts + experts * 3 * d * model.expert_hidden_size


def total_params(model: ModelConfig) -> int:
    """All parameters: embedding, blocks with every expert, final norm, output layer."""
    return 2 * model.embedding_size * model.d_model + model.d_model + model.n_layers * _layer_params(model, model.num_experts)


def active_params(model: ModelConfig) -> int:
    """Parameters one token uses: as ``total_params`` with only ``top_k`` experts per block."""
    return 2 * model.embedding_size * model.d_model + model.d_model + model.n_layers * _layer_params(model, model.top_k)


def matmul_params(model: ModelConfig) -> int:
    """The ``N`` of ``6 N``: what OLMo-core's FLOP count multiplies with (no embedding, no block norms)."""
    d = model.d_model
    per_layer = _layer_params(model, model.top_k) - 2 * d  # the two block norms are outside its count
    return model.n_layers * per_layer + model.embedding_size * d + d


def flops_per_token(model: ModelConfig, sequence_length: int) -> int:
    """Training (forward + backward) FLOPs per token: ``6 N`` plus causal attention."""
    return 6 * matmul_params(model) + 6 * model.n_layers * model.d_model * (sequence_length + 1)


@dataclass(frozen=True)
class Throughput:
    """How fast the GPUs train: ``gpu`` (a key of ``GPU_PEAK_FLOPS``) at ``mfu``, or, with
    ``measured_in``, at the tokens per second per GPU measured there (``measured_throughput``;
    the MFU then follows from it)."""

    gpu: str = DEFAULT_GPU
    mfu: float = DEFAULT_MFU
    measured_in: str | None = None

    def __post_init__(self) -> None:
        if self.gpu not in GPU_PEAK_FLOPS:
            raise ValueError(f"gpu {self.gpu!r} is not known; choose one of {', '.join(GPU_PEAK_FLOPS)}")
        if not 0 < self.mfu <= 1:
            raise ValueError(f"mfu must lie in (0, 1] (a fraction, e.g. 0.3); got {self.mfu}")


@dataclass(frozen=True)
class RunCost:
    """The cost of one run on ``gpus`` GPUs; ``mfu`` is assumed, or implied by a measured throughput."""

    name: str
    tokens: int
    steps: int
    flops_per_token: int
    flops: float
    gpu: str
    gpus: int
    mfu: float
    tokens_per_second_per_gpu: float
    gpu_hours: float
    wall_hours: float
    measured_in: str | None


def run_cost(run: RunConfig, gpus: int, throughput: Throughput = Throughput()) -> RunCost:
    """FLOPs, GPU-hours and wall time of ``run`` on ``gpus`` GPUs at ``throughput``."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1; got {gpus}")
    steps = run.train.max_steps
    tokens = steps * run.train.tokens_per_step
    per_token = flops_per_token(run.model, run.train.sequence_length)
    peak = GPU_PEAK_FLOPS[throughput.gpu]
    if throughput.measured_in is None:
        tps, mfu = throughput.mfu * peak / per_token, throughput.mfu
    else:
        tps = measured_throughput(throughput.measured_in, run)
        mfu = tps * per_token / peak
    gpu_seconds = tokens / tps
    return RunCost(run.name, tokens, steps, per_token, float(per_token) * tokens, throughput.gpu, gpus, mfu, tps,
                   gpu_seconds / 3600, gpu_seconds / 3600 / gpus, throughput.measured_in)


def measured_throughput(save_folder: str, run: RunConfig) -> float:
    """Tokens per second per GPU: the median ``throughput/device/TPS`` after the first step in a run's metrics file.

    ``save_folder`` is a short run of the same model, sequence length and micro-batch on the
    GPUs that will train (for example the config with ``--train.max_tokens`` cut to 50 steps);
    its ``run_config.json`` must say so. A ValueError names what does not fit.
    """
    config_path = os.path.join(save_folder, RUN_CONFIG_FILE)
    try:
        with open(config_path) as file:
            measured = json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"throughput from {save_folder}: cannot read {config_path} ({error})") from None
    mine = json.loads(json.dumps(dataclasses.asdict(run)))
    for section, key in (("model", None), ("train", "sequence_length"), ("train", "micro_batch_sequences")):
        ours, theirs = mine[section], measured.get(section, {})
        if key is not None:
            ours, theirs = ours[key], theirs.get(key)
        if ours != theirs:
            raise ValueError(f"throughput from {save_folder}: it trained another {section}{'.' + key if key else ''} "
                             f"({theirs!r}; this run: {ours!r}); measure with the same config")
    from olmoe_gatepro.jsonl import read_records

    path = os.path.join(save_folder, measured.get("callbacks", {}).get("metrics_file") or "metrics.jsonl")
    values = [(record["step"], record[THROUGHPUT_METRIC]) for record in read_records(path) if THROUGHPUT_METRIC in record]
    first = min((step for step, _ in values), default=None)
    values = [value for step, value in values if step != first]  # the first step compiles and warms up
    if len(values) < 3:
        raise ValueError(f"throughput from {save_folder}: {path} holds {len(values)} values of {THROUGHPUT_METRIC} "
                         "after the first step; train at least 5 steps with callbacks.metrics_file set")
    return statistics.median(values)


def _duration(hours: float) -> str:
    if hours >= 100:
        return f"{hours:,.0f} h"
    if hours >= 1:
        return f"{hours:.1f} h"
    return f"{60 * hours:.2g} min" if hours >= 1 / 60 else f"{3600 * hours:.2g} s"


def _gpus(count: int) -> str:
    return f"{count} GPU{'s' if count != 1 else ''}"


def format_cost(cost: RunCost) -> str:
    """Two lines: what the run computes, and what that takes on its GPUs."""
    how = (f"at {cost.tokens_per_second_per_gpu:,.0f} tokens/s per GPU measured in {cost.measured_in} "
           f"(MFU {100 * cost.mfu:.1f}% of the {cost.gpu}'s {GPU_PEAK_FLOPS[cost.gpu] / 1e12:g} TFLOP/s)"
           if cost.measured_in else
           f"at {100 * cost.mfu:g}% MFU (assumed) of the {cost.gpu}'s {GPU_PEAK_FLOPS[cost.gpu] / 1e12:g} dense bf16 "
           f"TFLOP/s ({cost.tokens_per_second_per_gpu:,.0f} tokens/s per GPU)")
    return (f"{cost.name}: {cost.tokens:,} tokens ({cost.steps:,} steps) x {cost.flops_per_token / 1e9:.4g} GFLOPs a "
            f"token = {cost.flops:.3e} FLOPs\n"
            f"{cost.name}: {cost.gpu_hours:,.{0 if cost.gpu_hours >= 10 else 3}f} GPU-hours, {_duration(cost.wall_hours)} "
            f"wall on {_gpus(cost.gpus)}, {how}")


def cost_lines(runs: list[RunConfig], gpus: int, throughput: Throughput) -> list[str]:
    """``format_cost`` of every run on ``gpus`` GPUs, and with several runs their total GPU-hours."""
    costs = [run_cost(run, gpus, throughput) for run in runs]
    lines = [line for cost in costs for line in format_cost(cost).splitlines()]
    if len(costs) > 1:
        lines.append(f"all {len(costs)} runs: {sum(cost.gpu_hours for cost in costs):,.0f} GPU-hours, "
                     f"{_duration(sum(cost.wall_hours for cost in costs))} wall one after another on {_gpus(gpus)}")
    return lines
