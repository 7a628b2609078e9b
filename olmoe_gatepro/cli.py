"""The ``olmoe-gatepro`` command line."""

import argparse
import dataclasses
import sys

from olmoe_gatepro.config import GateProConfig
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
    study.add_argument(
        "--out", default=None, help="report folder (default runs/study-<preset>); rerun to resume"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "smoke":
        try:
            tiny = _dataclass_from_args(TinyRunConfig, args, "")
            gatepro = _dataclass_from_args(GateProConfig, args, "gatepro-")
        except ValueError as error:
            parser.error(f"bad --gatepro-* flag: {error}")
        compare_tiny(tiny, gatepro, out_dir=args.out)
    elif args.command == "study":
        run_study(PRESETS[args.preset], args.out or f"runs/study-{args.preset}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
