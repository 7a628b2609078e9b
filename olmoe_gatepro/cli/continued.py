"""``continue``: continued training of a Hugging Face MoE checkpoint with the Trainer, GatePro on or off."""

from olmoe_gatepro.cli.common import check_model, check_out_folder, count, renamed_flags
from olmoe_gatepro.extras import require

FIELDS = ("max_tokens", "revision", "token_dtype", "sequence_length", "micro_batch_sequences",
          "gradient_accumulation_steps", "lr", "warmup_tokens", "seed", "metrics_interval_steps", "bf16")
# Flags of earlier versions, now spelt as OLMo-core's run configs spell the same settings.
RENAMED_FLAGS = {"--batch-size": "--micro-batch-sequences", "--learning-rate": "--lr",
                 "--metrics-interval": "--metrics-interval-steps", "--train-tokens": "--max-tokens",
                 "--tokens-dtype": "--token-dtype", "--warmup-steps": "--warmup-tokens"}


def register(command) -> None:
    resume = command("continue", continue_command,
                     help="continue training a Hugging Face MoE checkpoint with the Trainer, GatePro on or off")
    resume.add_argument("model", help="a Hugging Face folder or hub id (OLMoE, Qwen-MoE, FlexOlmo, Mixtral, ...)")
    resume.add_argument("--data", nargs="+", required=True, metavar="FILE",
                        help="OLMo-core token files (.npy) or text / .jsonl files (tokenised with the model's tokenizer)")
    resume.add_argument("--max-tokens", type=count, required=True, help="tokens to train on, e.g. 2e9 (train.max_tokens)")
    arm = resume.add_mutually_exclusive_group(required=True)
    arm.add_argument("--gatepro-penalty", type=float, default=None, help="the GatePro arm, at this lambda")
    arm.add_argument("--baseline", action="store_true", help="the arm without GatePro (its routing is still recorded)")
    resume.add_argument("--out", required=True, help="run folder: checkpoints, gatepro_metrics.jsonl, and hf/ at the end")
    resume.add_argument("--revision", default=None, help="hub revision of the model")
    resume.add_argument("--token-dtype", choices=("uint16", "uint32"), default="uint16", help="raw token files' dtype")
    for flag, default, text in (("--sequence-length", 2048, "tokens per sequence"),
                                ("--micro-batch-sequences", 4, "sequences per process and micro-batch"),
                                ("--gradient-accumulation-steps", 1, "micro-batches per optimizer step"),
                                ("--seed", 0, "data order and initial RNG"),
                                ("--metrics-interval-steps", 10, "log routing metrics every this many steps")):
        resume.add_argument(flag, type=int, default=default, help=f"{text} (default: {default})")
    resume.add_argument("--warmup-tokens", type=count, default=0,
                        help="linear warmup over this many tokens, in whole steps, e.g. 1e8 (then cosine decay; default 0)")
    resume.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default: 1e-5)")
    resume.add_argument("--bf16", action="store_true",
                        help="bfloat16 autocast; weights and optimizer state stay float32 (GPUs)")
    renamed_flags(resume, RENAMED_FLAGS)
    resume.add_argument("--report-to", nargs="+", default=["none"], metavar="NAME",
                        help="the Trainer's report_to: none (default), all, wandb, tensorboard, ...")


def continue_command(args, overrides, command) -> int:
    require("accelerate")  # the Trainer's own check names no module
    from olmoe_gatepro.core.config import GateProRunConfig
    from olmoe_gatepro.pipelines.continued_training import (
        ContinuedTraining,
        continue_training,
    )

    check_model(args.model, command)
    check_out_folder(args.out, command)
    try:
        gatepro = GateProRunConfig(enabled=not args.baseline,
                                   penalty=1e-4 if args.gatepro_penalty is None else args.gatepro_penalty)
    except ValueError as error:
        command.error(f"--gatepro-penalty: {str(error).removeprefix('GateProConfig.')}")
    try:
        spec = ContinuedTraining(model=args.model, data=tuple(args.data), gatepro=gatepro,
                                 **{name: getattr(args, name) for name in FIELDS}, report_to=tuple(args.report_to))
        record = continue_training(spec, args.out)
    except (ValueError, FileExistsError) as error:
        message = str(error)
        name = message.split()[0].rstrip(":")
        if name in (*FIELDS, "data", "report_to"):  # the field's flag: --max-tokens, --data, ...
            message = f"--{name.replace('_', '-')}: {message.removeprefix(f'{name}: ')}"
        command.error(message)
    print(f"continued {args.model} for {record['steps']} steps ({record['tokens']} tokens); wrote {args.out}/hf")
    return 0
