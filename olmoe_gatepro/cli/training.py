"""``train``, ``convert`` and ``prepare-data``: OLMo-core training from the YAML recipes, and its inputs and outputs."""

import dataclasses
import json

from olmoe_gatepro.cli.common import check_out_folder


def register(command) -> None:
    train = command(
        "train", train_command, takes_overrides=True,
        help="train an OLMoE with OLMo-core from a YAML config (under torchrun; GPUs, or a CPU for tiny configs)",
        description="Overrides: any key as --section.key=value, e.g. --gatepro.penalty=1e-3.",
    )
    train.add_argument("config", help="a YAML run config, e.g. configs/olmoe-1b-7b/gatepro.yaml "
                                      "(`olmoe-gatepro config list` lists the shipped ones)")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    convert = command(
        "convert", convert_command, takes_overrides=True,
        help="convert an OLMo-core checkpoint into a Hugging Face OlmoeForCausalLM folder",
        description="Overrides of --config: any key as --section.key=value.",
    )
    convert.add_argument("checkpoint", help="a training save folder (its latest step) or one stepN folder")
    convert.add_argument("--out", required=True, help="a new folder for the Hugging Face model")
    convert.add_argument("--config", default=None,
                         help="the run's YAML config (default: run_config.json in the save folder)")
    convert.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    convert.add_argument("--no-validate", action="store_true",
                         help="skip comparing the converted model's logits with OLMo-core's")
    prepare = command("prepare-data", prepare_data_command, help="tokenise local text files into OLMo-core token files")
    prepare.add_argument("inputs", nargs="+", help=".jsonl/.jsonl.gz (key 'text') or plain text files")
    prepare.add_argument("--out", required=True, help="an empty folder for part-NNNNN.npy shards")
    prepare.add_argument("--tokenizer", default="bytes", help="'bytes', a tokenizer.json, or a hub name")
    prepare.add_argument("--eos-token-id", type=int, default=0)
    prepare.add_argument("--dtype", choices=("uint16", "uint32"), default="uint16")
    prepare.add_argument("--tokens-per-file", type=int, default=100_000_000)

def train_command(args, overrides, command) -> int:
    from olmoe_gatepro.olmo_core.run_config import ConfigError, load_run_config

    try:
        run = load_run_config(args.config, overrides)
    except ConfigError as error:
        command.error(str(error))
    if "://" not in run.train.save_folder:  # a local save folder must be writable (URLs are OLMo-core's to check)
        check_out_folder(run.train.save_folder, command, f"{args.config}: train.save_folder")
    if args.dry_run:
        print(json.dumps(dataclasses.asdict(run), indent=2))
        return 0
    from olmoe_gatepro.olmo_core.train import train

    try:
        train(run)
    except ConfigError as error:  # found while building: an evaluation task too long, a file missing
        command.error(f"{args.config}: {error}")
    return 0

def convert_command(args, overrides, command) -> int:
    import sys

    from olmoe_gatepro.olmo_core.convert import convert_checkpoint
    from olmoe_gatepro.olmo_core.run_config import load_run_config

    if overrides and args.config is None:
        command.error(f"overrides {overrides} need --config")
    try:
        run = None if args.config is None else load_run_config(args.config, overrides)
        record = convert_checkpoint(args.checkpoint, args.out, run=run, dtype=args.dtype, validate=not args.no_validate)
    except (OSError, ValueError) as error:  # ConfigError is a ValueError
        command.error(str(error))
    except RuntimeError as error:
        print(f"olmoe-gatepro convert: {error}", file=sys.stderr)
        return 1
    check = record["validation"]
    if check:
        print(f"validated: logits within {check['max_abs_logit_difference']:.2e} of OLMo-core on {check['tokens']} tokens")
    print(f"wrote {args.out} (step {record['step']} of {record['source']})")
    return 0

def prepare_data_command(args, overrides, command) -> int:
    from olmoe_gatepro.data import write_token_files

    for flag, value, low in (("--tokens-per-file", args.tokens_per_file, 1), ("--eos-token-id", args.eos_token_id, 0)):
        if value < low:
            command.error(f"{flag} must be >= {low}; got {value}")
    try:
        paths = write_token_files(args.inputs, args.out, args.tokenizer, args.eos_token_id, args.dtype, args.tokens_per_file)
    except (ValueError, OSError) as error:
        command.error(str(error))
    print(f"wrote {len(paths)} token file(s) to {args.out}")
    return 0
