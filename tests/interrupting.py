"""Ctrl-C for the tests: run a command in a subprocess and send it a real SIGINT once it is busy.

As a terminal does, the SIGINT goes to the command's whole process group (its worker processes too).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# The command line with this project's test presets registered (tests/presets.py), as conftest does in process.
CLI = [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); import presets; presets.register(); "
       "from olmoe_gatepro.cli import main; sys.exit(main(sys.argv[1:]))", os.path.dirname(os.path.abspath(__file__))]


def single_threaded_env() -> dict:
    """The environment with one intra-op thread, so that a command's runs agree bit for bit."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def run(command: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=single_threaded_env())


def interrupt_once(command: list[str], busy, log: Path, timeout: float = 600, grace: float = 120,
                   env: dict | None = None) -> tuple[int, str, float]:
    """Start ``command``; once ``busy()`` is true send SIGINT; return (exit code, output, seconds to exit).

    ``env``: default ``single_threaded_env()``. Fails if the command ends before it is busy, or
    is still running ``grace`` seconds after the signal.
    """
    with open(log, "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                   env=single_threaded_env() if env is None else env)
        deadline = time.monotonic() + timeout
        while not busy():
            assert process.poll() is None, f"ended (exit {process.returncode}) before it was busy:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "never got busy"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGINT)
        sent = time.monotonic()
        try:
            code = process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError(f"still running {grace} s after SIGINT:\n{log.read_text()[-3000:]}") from None
    return code, log.read_text(), time.monotonic() - sent
