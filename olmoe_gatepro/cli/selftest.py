"""``selftest``: does GatePro work on this machine, and what does it cost?"""

from olmoe_gatepro.cli.common import check_out_file, device


def register(command) -> None:
    selftest = command("selftest", selftest_command,
                       help="check that GatePro works on this machine (GPU, else CPU) and what it costs")
    selftest.add_argument("--quick", action="store_true", help="smaller measurements (under 2 minutes on a 2-core CPU)")
    selftest.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")
    selftest.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one)")
    selftest.add_argument("--only", action="append", default=[], metavar="CHECK",
                          help="run only this check (repeat), e.g. --only 'GatePro math'")


def selftest_command(args, overrides, command) -> int:
    from olmoe_gatepro.jsonl import write_text_atomically
    from olmoe_gatepro.pipelines.selftest import results_json, run_selftest

    chosen = device(args.device, command)
    if args.json:
        check_out_file(args.json, command, "--json")
    try:
        results = run_selftest(chosen, quick=args.quick, only=tuple(args.only))
    except ValueError as error:
        command.error(f"--only: {error}")
    if args.json:
        write_text_atomically(args.json, results_json(results))
    return 1 if any(result.status == "FAIL" for result in results) else 0
