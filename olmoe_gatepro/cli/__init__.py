"""The ``olmoe-gatepro`` command line.

Bad input (a flag, a config key, a file, a folder) ends with one line naming the value and
where it came from, exit code 2 and no traceback, before anything is written; Ctrl-C ends with
exit code 130.

One module per command group; each registers its commands and only parses flags, then calls a
library function, importing torch and the frameworks only when a command runs, so that
``--help`` and ``--version`` answer at once.
"""

import argparse
import dataclasses
import errno
import sys
import warnings

from olmoe_gatepro.cli import (
    config,
    continued,
    evaluation,
    reproduce,
    selftest,
    tiny,
    training,
)
from olmoe_gatepro.cli.common import check_unknown
from olmoe_gatepro.extras import missing_extra

__all__ = ["build_parser", "main"]

GROUPS = (tiny, training, reproduce, evaluation, continued, selftest, config)
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # errors only a write gets


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("olmoe-gatepro")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="olmoe-gatepro", description="GatePro (arXiv 2510.13079) for OLMoE-style MoE models: train, convert, evaluate, compare, inspect.")
    parser.add_argument("--version", action="version", version=f"olmoe-gatepro {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler=None, takes_overrides: bool = False, **kwargs) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, **kwargs)
        sub.set_defaults(handler=handler, command_parser=sub, takes_overrides=takes_overrides)
        return sub

    for group in GROUPS:
        group.register(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    command = args.command_parser
    sections = None
    if args.takes_overrides:
        from olmoe_gatepro.olmo_core.run_config import RunConfig

        sections = {field.name for field in dataclasses.fields(RunConfig)}
    check_unknown(unknown, command, sections)
    from olmoe_gatepro.env_activation import config_from_env

    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        try:
            config_from_env()  # a bad OLMOE_GATEPRO* value stops here, not at a router's import
        except ValueError as error:
            command.error(str(error))
    for warning in warned:  # a misspelt OLMOE_GATEPRO_* variable: one line, not a warning's two
        print(f"olmoe-gatepro {args.command}: warning: {warning.message}", file=sys.stderr)
    from olmoe_gatepro.interrupts import remembered_interrupts

    try:
        with remembered_interrupts():
            return _run(args, unknown, command) or 0
    except ImportError as error:  # an optional install is missing: say which, in one line
        message = missing_extra(error)
        if message is None:
            raise
        command.error(message)
    except OSError as error:  # a full disk, a read-only folder: one line naming the path
        from olmoe_gatepro.jsonl import FileWriteError, write_error

        if isinstance(error, FileWriteError) or error.errno in WRITE_ERRNOS:
            command.error(str(write_error(error, error.filename or "a file")))
        if error.errno in (errno.EACCES, errno.EPERM) and error.filename:
            command.error(f"{error.filename}: permission denied")
        raise
    except Exception as error:  # sizes too large for this machine; a full disk that a Rust library reports
        from olmoe_gatepro.devices import out_of_memory
        from olmoe_gatepro.jsonl import os_error_of, write_error

        failed_write = os_error_of(error)
        if failed_write is not None and failed_write.errno in WRITE_ERRNOS:
            command.error(f"cannot write the output: {write_error(failed_write, '').strerror} ({type(error).__name__})")
        message = out_of_memory(error)
        if message is None:
            raise
        command.error(message)
    except KeyboardInterrupt:
        print(f"olmoe-gatepro {args.command}: interrupted", file=sys.stderr)
        return 130


def _run(args, overrides: list[str], command) -> int | None:
    return args.handler(args, overrides, command)
