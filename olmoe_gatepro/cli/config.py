"""``config list`` and ``config show``: the YAML recipes that ship with the package, to read or copy for editing."""

import os
import shutil
import sys

from olmoe_gatepro.cli.common import check_out_folder


def register(command) -> None:
    config = command("config", help="list, show or copy the run configs (YAML recipes) this package ships")
    actions = config.add_subparsers(dest="config_action", required=True, metavar="{list,show}")
    listing = actions.add_parser("list", help="the shipped configs, one name per line")
    listing.set_defaults(handler=list_command, command_parser=listing)
    show = actions.add_parser("show", help="print a shipped config, or copy it (and the files it inherits) for editing")
    show.set_defaults(handler=show_command, command_parser=show)
    show.add_argument("name", help="a name from `olmoe-gatepro config list`, e.g. olmoe-1b-7b/gatepro")
    show.add_argument("--copy-to", default=None, metavar="FOLDER",
                      help="copy the config and the files it inherits into FOLDER, keeping their relative layout, "
                           "so that `olmoe-gatepro train FOLDER/NAME.yaml` runs it")


def list_command(args, overrides, command) -> int:
    from olmoe_gatepro.olmo_core.run_config import shipped_configs

    print("\n".join(shipped_configs()))
    return 0


def show_command(args, overrides, command) -> int:
    import difflib

    from olmoe_gatepro.olmo_core.run_config import (
        SHIPPED_CONFIGS,
        inherit_chain,
        shipped_config_path,
        shipped_configs,
    )

    path = shipped_config_path(args.name)
    if path is None:
        close = difflib.get_close_matches(args.name.removesuffix(".yaml"), shipped_configs(), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else ""
        command.error(f"no shipped config named {args.name!r}{hint} (`olmoe-gatepro config list` lists them)")
    if args.copy_to is None:
        sys.stdout.write(path.read_text())
        return 0
    chain = [os.path.relpath(file, SHIPPED_CONFIGS) for file in inherit_chain(str(path))]
    targets = [os.path.join(args.copy_to, name) for name in chain]
    existing = [target for target in targets if os.path.exists(target)]
    if existing:
        command.error(f"--copy-to {args.copy_to}: {existing[0]} exists; choose another folder or remove it")
    check_out_folder(args.copy_to, command, "--copy-to")
    try:
        for name, target in zip(chain, targets):
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            shutil.copyfile(SHIPPED_CONFIGS / name, target)
    except OSError as error:
        command.error(f"--copy-to {args.copy_to}: cannot write {error.filename or 'there'} ({error.strerror})")
    print(f"copied {', '.join(chain)} to {args.copy_to}; edit {targets[0]}")
    return 0
