"""The tiny CPU trainings are deterministic for a seed, whatever the environment's thread settings."""

import hashlib
import os
import subprocess
import sys

import pytest

TRAIN = """
import sys
from olmoe_gatepro.core.config import GateProConfig
from olmoe_gatepro.pipelines.presets import TinyRunConfig
from olmoe_gatepro.pipelines.tiny_run import corpus_tokens, train_tiny
config = TinyRunConfig(steps=20, global_batch_sequences=8, sequence_length=64, n_layers=2, num_experts=8, top_k=2, metrics_interval_steps=5)
train_tiny(config, GateProConfig(), corpus_tokens(), checkpoint_dir=sys.argv[1])
"""


def _train_in_a_process(folder, threads):
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    subprocess.run([sys.executable, "-c", TRAIN, str(folder)], env=env, check=True, capture_output=True)
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_identical_weights_in_separate_processes(tmp_path):
    # Unpinned, 1 and 2 intra-op threads give different weights within these 20 steps (measured);
    # the default environment (all cores) must agree with both.
    hashes = {threads: _train_in_a_process(tmp_path / f"threads-{threads}", threads) for threads in (None, 1, 2)}
    assert len(set(hashes.values())) == 1, hashes


def test_deterministic_cpu_restores_the_callers_settings():
    import torch

    from olmoe_gatepro.pipelines.tiny_run import deterministic_cpu

    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with deterministic_cpu():
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before
    with pytest.raises(RuntimeError), deterministic_cpu():
        raise RuntimeError("an error inside the block")
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before
