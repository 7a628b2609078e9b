"""What every command shares: flags from dataclasses, presets, and the checks of paths and devices.

Nothing here imports torch at module level: parsing must answer at once.
"""

import argparse
import dataclasses
import difflib
import os
import re

__all__ = ["renamed_flags", "cost_flags", "throughput", "dest", "preset_flag", "add_dataclass_flags", "parse_bool",
           "dataclass_or_error", "check_unknown", "check_out_folder", "check_out_file", "device", "check_model",
           "per_model", "count"]


def cost_flags(parser: argparse.ArgumentParser) -> None:
    """The cost estimate's flags: the GPU, the assumed MFU, or a measured throughput."""
    from olmoe_gatepro.olmo_core.cost import DEFAULT_GPU, DEFAULT_MFU, GPU_PEAK_FLOPS

    group = parser.add_argument_group("cost estimate (FLOPs = 6 x active matmul parameters x tokens + attention)")
    group.add_argument("--gpu", choices=sorted(GPU_PEAK_FLOPS), default=DEFAULT_GPU,
                       help=f"the GPU, for its dense bf16 peak (default: {DEFAULT_GPU})")
    group.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                       help=f"assumed model FLOPs utilisation, a fraction (default: {DEFAULT_MFU})")
    group.add_argument("--throughput-from", default=None, metavar="SAVE_FOLDER",
                       help="use the tokens/s per GPU measured by a short run of the same config on these GPUs "
                            "(its metrics file) instead of --mfu")


def throughput(args: argparse.Namespace, command: argparse.ArgumentParser):
    """``olmo_core.cost.Throughput`` from the cost flags; a bad value names its flag."""
    from olmoe_gatepro.olmo_core.cost import Throughput

    if args.throughput_from is not None and not os.path.isdir(args.throughput_from):
        command.error(f"--throughput-from {args.throughput_from}: no such folder")
    try:
        return Throughput(gpu=args.gpu, mfu=args.mfu, measured_in=args.throughput_from)
    except ValueError as error:
        command.error(f"--{str(error).split()[0]}: {error}")


def dest(flag: str) -> str:
    """The argparse destination of ``--a-flag``: ``a_flag``."""
    return flag.removeprefix("--").replace("-", "_")


def preset_flag(parser: argparse.ArgumentParser, presets: dict, default: str, what: str) -> None:
    """``--preset``, checked against ``presets`` when parsing (tests may add presets to the table)."""
    shown = sorted(presets)

    def preset(text: str) -> str:
        if text not in presets:
            raise argparse.ArgumentTypeError(f"unknown preset {text!r}; choose one of {', '.join(shown)}")
        return text

    parser.add_argument("--preset", type=preset, default=default, metavar="{" + ",".join(shown) + "}",
                        help=f"{what} (default: {default})")


def renamed_flags(parser: argparse.ArgumentParser, renamed: dict[str, str]) -> None:
    """Refuse each old flag of ``renamed`` (old -> new) with a pointer to its new name.

    Registered as hidden flags, so that an old flag is never taken as an abbreviation of its new one.
    """
    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            parser.error(f"{option_string} is now {renamed[option_string]} (the name OLMo-core's run configs use)")

    for old in renamed:
        parser.add_argument(old, action=Renamed, nargs="?", help=argparse.SUPPRESS)


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, prefix: str, helps: dict[str, str]) -> None:
    """One ``--{prefix}{field}`` flag per field of the dataclass ``cls``, typed by its default."""
    for field in dataclasses.fields(cls):
        default = field.default
        flag = f"--{prefix}{field.name.replace('_', '-')}"
        text = f"{helps.get(field.name, field.name)} (default: {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, type=parse_bool, default=default, metavar="BOOL", help=text)
        elif default is None:
            parser.add_argument(flag, type=int, default=None, metavar="INT", help=text)
        else:
            parser.add_argument(flag, type=type(default), default=default, help=text)


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def dataclass_or_error(cls, args: argparse.Namespace, prefix: str, command: argparse.ArgumentParser):
    """``cls`` from its flags; a refused value ends with an error naming the flag it came from."""
    dest_prefix = prefix.replace("-", "_")
    try:
        return cls(**{f.name: getattr(args, dest_prefix + f.name) for f in dataclasses.fields(cls)})
    except ValueError as error:
        message = str(error).removeprefix(f"{cls.__name__}.")
        field = message.split()[0]  # the messages of both configs start with the field's name
        names = {f.name for f in dataclasses.fields(cls)}
        flag = f"--{prefix}{field.replace('_', '-')}: " if field in names else ""
        command.error(f"{flag}{message}")


OVERRIDE = re.compile(r"--(?P<section>[A-Za-z_]+)(\.[A-Za-z_]+)*=.*")


def check_unknown(unknown: list[str], command: argparse.ArgumentParser, sections: set[str] | None) -> None:
    """Refuse what argparse did not know, suggesting the closest flag; keep ``--section.key=value``
    when the command takes config overrides (``sections``: the run config's section names)."""
    for item in unknown:
        match = OVERRIDE.fullmatch(item)
        if sections is not None and match and match["section"] in sections:
            continue
        flag = item.split("=")[0]
        known = [option for action in command._actions for option in action.option_strings]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        form = " (config overrides take the form --section.key=value)" if sections is not None else ""
        command.error(f"unrecognized argument {item!r}{hint}{form}")


def check_out_folder(path: str, command: argparse.ArgumentParser, flag: str = "--out") -> None:
    """``path`` must be a folder, or creatable as one; nothing is created here."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            command.error(f"{flag} {path}: exists and is not a folder")
        if not os.access(path, os.W_OK):
            command.error(f"{flag} {path}: not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        command.error(f"{flag} {path}: cannot be created ({parent} is not a writable folder)")


def device(requested: str | None, command: argparse.ArgumentParser) -> str:
    """``--device`` checked against this machine's GPUs (``devices.resolve_device``), or cuda when there is one."""
    from olmoe_gatepro.devices import resolve_device

    try:
        return resolve_device(requested)
    except ValueError as error:
        command.error(str(error))


def check_out_file(path: str, command: argparse.ArgumentParser, flag: str) -> None:
    """``path`` must name a file (not a folder) in an existing, writable folder; nothing is created here."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder):
        command.error(f"{flag} {path}: not a file path in an existing folder")
    if not os.access(folder, os.W_OK):
        command.error(f"{flag} {path}: {folder} is not writable")


def check_model(model: str, command: argparse.ArgumentParser) -> None:
    """A local folder with a config.json, or something shaped like a hub id that is not a local path."""
    from olmoe_gatepro.checkpoints import check_model_files, model_kind

    if os.path.isdir(model) and not os.path.exists(os.path.join(model, "config.json")):
        command.error(f"model {model}: a folder without config.json, not a Hugging Face model folder")
    try:
        model_kind(model)  # a file, or neither a folder nor shaped like a hub id
        check_model_files(model)  # a config that is not JSON, a weight file cut short
    except ValueError as error:
        command.error(str(error))


def per_model(values: list, flag: str, count_: int, command: argparse.ArgumentParser) -> list:
    """A flag given once (for every model), once per model, or not at all (None for each)."""
    if not values:
        return [None] * count_
    if len(values) == 1:
        return values * count_
    if len(values) != count_:
        command.error(f"{flag} is given {len(values)} times for {count_} models: give it once, or once per model")
    return values


def count(text: str) -> int:
    """A whole number, also written like 2e9."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number such as 2000000 or 2e9, got {text!r}") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(value)
