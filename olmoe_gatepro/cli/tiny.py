"""``smoke`` and ``study``: tiny OLMoEs trained on this machine, with and without GatePro."""

import dataclasses

from olmoe_gatepro.cli.common import (
    add_dataclass_flags,
    check_out_folder,
    dataclass_or_error,
    device,
    preset_flag,
    renamed_flags,
)
from olmoe_gatepro.core.config import GateProConfig
from olmoe_gatepro.extras import require
from olmoe_gatepro.pipelines.presets import STUDY_PRESETS, TinyRunConfig

SMOKE_HELP = {
    "seed": "initial weights and batch order",
    "steps": "training steps per model",
    "global_batch_sequences": "sequences per step",
    "sequence_length": "tokens per sequence",
    "d_model": "model width",
    "n_layers": "transformer blocks (each an MoE layer)",
    "n_heads": "attention heads; must divide --d-model",
    "num_experts": "experts per MoE layer (>= 2)",
    "top_k": "experts chosen per token (<= --num-experts)",
    "expert_hidden_size": "hidden size of each expert",
    "lr": "AdamW learning rate",
    "lb_loss_weight": "load-balancing loss weight (0 switches it off)",
    "metrics_interval_steps": "record routing metrics every this many steps",
    "device": "cpu or cuda[:N]",
    "corpus": "small (six standard-library modules) or stdlib (all of it)",
    "enabled": "route the GatePro run with GatePro (false: two baselines)",
    "penalty": "lambda, subtracted from a losing expert's logit",
    "num_competitors": "m, partners each expert competes against",
    "hard": "a loser is never chosen",
    "partner_refresh_steps": "cache the partner table, recomputed every N steps (default: every forward)",
}


# Flags of earlier versions, now spelt as OLMo-core's run configs spell the same settings.
RENAMED_FLAGS = {f"--{old.replace('_', '-')}": f"--{new.replace('_', '-')}" for old, new in (
    ("batch_size", "global_batch_sequences"), ("seq_len", "sequence_length"), ("hidden_size", "d_model"),
    ("num_layers", "n_layers"), ("num_heads", "n_heads"), ("learning_rate", "lr"),
    ("router_aux_loss_coef", "lb_loss_weight"), ("log_every", "metrics_interval_steps"))}


def register(command) -> None:
    smoke = command("smoke", smoke_command,
                    help="train a tiny OLMoE on the CPU with and without GatePro and print routing metrics")
    add_dataclass_flags(smoke, TinyRunConfig, "", SMOKE_HELP)
    add_dataclass_flags(smoke, GateProConfig, "gatepro-", SMOKE_HELP)
    renamed_flags(smoke, RENAMED_FLAGS)
    smoke.add_argument("--out", default="runs/smoke", help="folder for tiny_comparison.json (default: runs/smoke)")
    study = command("study", study_command,
                    help="train tiny OLMoEs that differ only in GatePro (lambda, variants, LBL) and report routing")
    preset_flag(study, STUDY_PRESETS, "cpu", "the study's grid and model")
    study.add_argument("--num-experts", type=int, default=None, help="override the preset's expert count")
    study.add_argument("--out", default=None, help="report folder (default runs/study-<preset>); rerun to resume")


def smoke_command(args, overrides, command) -> int:
    require("accelerate")  # the Trainer's own check names no module
    from olmoe_gatepro.pipelines.tiny_run import compare_tiny

    tiny = dataclass_or_error(TinyRunConfig, args, "", command)
    tiny = dataclasses.replace(tiny, device=device(tiny.device, command))  # a GPU this machine has, or refused
    gatepro = dataclass_or_error(GateProConfig, args, "gatepro-", command)
    if gatepro.num_competitors >= tiny.num_experts:
        command.error(f"--gatepro-num-competitors ({gatepro.num_competitors}) must be < --num-experts "
                      f"({tiny.num_experts})")
    check_out_folder(args.out, command)
    try:
        compare_tiny(tiny, gatepro, out_dir=args.out)
    except ValueError as error:  # found once the corpus is read: a --seq-len longer than it
        message = str(error)
        flag = message.split()[0]
        command.error(f"--{flag.replace('_', '-')}: {message}" if flag in SMOKE_HELP else message)
    return 0


def study_command(args, overrides, command) -> int:
    require("accelerate")  # the Trainer's own check names no module
    import torch

    from olmoe_gatepro.pipelines.study import run_study

    if args.preset == "gpu" and not torch.cuda.is_available():
        command.error("--preset gpu needs a CUDA GPU; none is visible (use --preset cpu)")
    if args.num_experts is not None and args.num_experts < 2:
        command.error(f"--num-experts must be >= 2; got {args.num_experts}")
    suffix = f"-{args.num_experts}experts" if args.num_experts else ""
    out = args.out or f"runs/study-{args.preset}{suffix}"
    check_out_folder(out, command)
    try:
        run_study(STUDY_PRESETS[args.preset], out, num_experts=args.num_experts)
    except ValueError as error:
        command.error(str(error))
    return 0
