"""A STOP file stops an OLMo-core training after a checkpoint; started again it ends where an uninterrupted run ends.

This is what the SLURM scripts do on the warning before a time limit (``olmo_core.stop``). Tiny
CPU runs as in test_olmo_core_end_to_end.py: 6 steps of 2 x 16 tokens, a cancel check every step.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoint_state import assert_same_state, checkpoint_state
from olmoe_gatepro.checkpoints import complete_steps
from olmoe_gatepro.cli import main

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--train.sequence_length=16", "--train.global_batch_sequences=2", "--train.micro_batch_sequences=2",
         "--train.max_tokens=192", "--train.checkpoint_interval_steps=2", "--train.metrics_interval_steps=1",
         "--train.cancel_check_interval_steps=1", "--optim.warmup_tokens=32"]


def _train(folder: Path, tokens: Path, expect: int = 0) -> str:
    command = [sys.executable, "-m", "olmoe_gatepro.cli", "train", str(ROOT / "configs/tiny-test.yaml"),
               f"--train.save_folder={folder}", f"--data.paths=[{tokens}/*.npy]", *SMALL]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == expect, result.stderr[-4000:]
    return result.stderr + result.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("stop")
    text = root / "text.txt"
    text.write_text(" ".join(f"word{i % 41} in sentence {i}." for i in range(3000)))
    assert main(["prepare-data", str(text), "--out", str(root / "tokens")]) == 0
    straight = root / "straight"
    _train(straight, root / "tokens")
    stopped = root / "stopped"
    stopped.mkdir()
    (stopped / "STOP").touch()
    first = _train(stopped, root / "tokens", expect=1)  # stopped before its end: not a success
    stopped_at = complete_steps(str(stopped))
    done_after_stop = (stopped / "train.done").exists()
    (stopped / "STOP").unlink()
    second = _train(stopped, root / "tokens")
    return root, first, stopped_at, done_after_stop, second


def test_the_stop_file_stops_after_a_checkpoint(runs):
    root, first, stopped_at, done_after_stop, _ = runs
    assert stopped_at and stopped_at[-1] < 6 and not done_after_stop
    assert f"the run was cancelled: stopped at step {stopped_at[-1]} with a checkpoint in {root}/stopped" in first
    assert "STOP exists: stopping at the next cancel check" in first


def test_started_again_it_ends_exactly_where_an_uninterrupted_run_ends(runs):
    root, _, stopped_at, _, second = runs
    assert f"Loading checkpoint from '{root}/stopped/step{stopped_at[-1]}'" in second
    for name in ("straight", "stopped"):
        assert json.loads((root / name / "train.done").read_text()) == {"step": 6, "tokens": 192}
    assert_same_state(checkpoint_state(root / "straight/step6"), checkpoint_state(root / "stopped/step6"))
