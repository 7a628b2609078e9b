"""Parsing the command line imports no framework: ``--help`` and ``--version`` answer at once."""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "olmo_core", "lm_eval", "datasets", "matplotlib", "numpy", "scipy")
PROBE = """
import json, sys
from olmoe_gatepro.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(name for name in {heavy} if name in sys.modules)), file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["train", "--help"], ["smoke", "--help"],
                                  ["config", "show", "olmoe-1b-7b/gatepro"]])
def test_parsing_imports_no_framework(argv):
    completed = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv],
                               capture_output=True, text=True, timeout=60)
    imported = json.loads(completed.stderr.strip().splitlines()[-1])
    assert imported == [], f"{argv} imported {imported}"
    assert completed.stdout.strip()


def test_the_probe_sees_a_framework_import():
    """The check can fail: a probe that imports torch reports it."""
    completed = subprocess.run([sys.executable, "-c", "import torch\n" + PROBE.format(heavy=HEAVY), "--version"],
                               capture_output=True, text=True, timeout=120)
    assert "torch" in json.loads(completed.stderr.strip().splitlines()[-1])
