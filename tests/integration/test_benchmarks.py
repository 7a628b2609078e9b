"""The benchmarks run and print their summary line (no timing is asserted)."""

import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_router_overhead_quick_on_tiny_shapes():
    out = _run("router_overhead.py", "--quick", "--device", "cpu", "--d-model", "32", "--experts", "8",
               "--tokens", "64", "128", "--top-k", "2")
    rows = [line for line in out.splitlines() if re.match(r"(eager|compile)\s+32\s+8\s+(64|128)\s", line)]
    assert len(rows) == 4, out
    assert out.strip().splitlines()[-1].startswith("overhead_ratio=")


def test_train_throughput_quick_on_tiny_shapes():
    out = _run("train_throughput.py", "--quick", "--d-model", "32", "--experts", "8", "--expert-hidden", "16",
               "--top-k", "2", "--sequence-length", "16")
    assert "stock" in out and "gatepro" in out
    assert re.fullmatch(r"throughput_ratio=\d+\.\d{4}", out.strip().splitlines()[-1])
