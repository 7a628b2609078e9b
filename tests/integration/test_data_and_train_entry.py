"""Token-file preparation, the OLMo-core data path of the training entry point, config resolution.

Training itself, end to end, is in test_olmo_core_end_to_end.py.
"""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from olmoe_gatepro.cli import main
from olmoe_gatepro.olmo_core.run_config import load_run_config
from olmoe_gatepro.data import write_token_files

ROOT = Path(__file__).resolve().parents[2]


def _corpus(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.txt").write_text("héllo world\n" * 200)
    with gzip.open(inputs / "b.jsonl.gz", "wt") as file:
        for i in range(50):
            file.write(json.dumps({"text": f"document number {i} " * 20}) + "\n")
    return [str(inputs / "a.txt"), str(inputs / "b.jsonl.gz")]


def test_token_files_hold_documents_followed_by_eos(tmp_path):
    inputs = _corpus(tmp_path)
    paths = write_token_files(inputs, str(tmp_path / "tokens"), eos_token_id=0, tokens_per_file=5000)
    tokens = np.concatenate([np.fromfile(path, dtype=np.uint16) for path in paths])
    expected = list("héllo world\n".encode() * 200) + [0]
    for i in range(50):
        expected += list(f"document number {i} ".encode() * 20) + [0]
    assert tokens.tolist() == expected
    assert len(paths) >= 2 and all(np.fromfile(p, dtype=np.uint16).size >= 5000 for p in paths[:-1])
    assert not list((tmp_path / "tokens").glob("*.partial"))


def test_token_file_errors(tmp_path):
    inputs = _corpus(tmp_path)
    out = str(tmp_path / "tokens")
    write_token_files(inputs, out)
    with pytest.raises(ValueError, match="already holds token files"):
        write_token_files(inputs, out)
    with pytest.raises(ValueError, match="not found: .*missing.txt"):
        write_token_files([str(tmp_path / "missing.txt")], str(tmp_path / "other"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 2: expected a JSON object with a 'text' key"):
        write_token_files([str(bad)], str(tmp_path / "third"))
    assert not list((tmp_path / "third").glob("*.npy"))


def test_prepared_tokens_feed_olmo_core_data_loader(tmp_path):
    assert main(["prepare-data", *_corpus(tmp_path), "--out", str(tmp_path / "tokens"), "--tokens-per-file", "4000"]) == 0
    from olmoe_gatepro.olmo_core.train import build_train_components

    run = load_run_config(
        str(ROOT / "configs/tiny-test.yaml"),
        [f"--data.paths=[{tmp_path}/tokens/*.npy]", f"--train.save_folder={tmp_path}/run"],
    )
    parts = build_train_components(run)
    assert parts.data_loader.global_batch_size == run.train.tokens_per_step == 512
    assert parts.train_module.rank_microbatch_size == 4 * 64
    from olmoe_gatepro.olmo_core.train import monitoring_callbacks

    names = list(parts.trainer.callbacks)
    assert names[:4] == ["checkpointer", "interrupt", "gatepro", "stop_file"] and names[4:] == list(monitoring_callbacks(run))
    assert parts.trainer.cancel_check_interval == 1  # Ctrl-C stops at the next step
    assert {"garbage_collector", "config_saver", "metrics_file"} <= set(names)  # the defaults of callbacks:
    assert parts.trainer.callbacks["gatepro"].gatepro == run.gatepro
    dataset = parts.dataset.build()
    dataset.prepare()
    loader = parts.data_loader.build(dataset)
    loader.reshuffle(epoch=1)
    batch = next(iter(loader))
    assert tuple(batch["input_ids"].shape) == (8, 64)
    assert int(batch["input_ids"].max()) < 256


def test_train_dry_run_and_script_entry_point(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/train.py"), str(ROOT / "configs/olmoe-1b-7b/gatepro.yaml"),
         "--gatepro.penalty=1e-3", "--dry-run"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["gatepro"]["penalty"] == 1e-3 and resolved["model"]["num_experts"] == 64
    bad = subprocess.run(
        [sys.executable, str(ROOT / "scripts/train.py"), str(ROOT / "configs/tiny-test.yaml"), "--model.top_k=99", "--dry-run"],
        capture_output=True, text=True,
    )
    assert bad.returncode == 2 and "tiny-test.yaml with overrides" in bad.stderr and "top_k (99)" in bad.stderr


def test_packaged_tokenizer_identifiers_load_without_the_hub():
    from olmoe_gatepro.data import hf_tokenizer, load_tokenizer, tokenizer_file

    name = "tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json"  # the OLMoE config's tokenizer.identifier
    assert tokenizer_file(name).endswith("olmo_eval/" + name)
    assert tokenizer_file("allenai/gpt-neox-olmo-dolma-v1_5") is None and tokenizer_file("bytes") is None
    assert load_tokenizer(name)("Hello world") == [12092, 1533]
    tokenizer = hf_tokenizer(name, eos_token_id=50279, pad_token_id=1)
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|endoftext|>", "<|padding|>")
    with pytest.raises(ValueError, match="ships no such file; it ships .*allenai_gpt-neox-olmo-dolma-v1_5.json"):
        tokenizer_file("tokenizers/gpt2.json")
