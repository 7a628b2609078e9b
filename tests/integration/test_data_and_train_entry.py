"""Token-file preparation, the OLMo-core data path of the training entry point, config resolution.

Training itself, end to end, is in test_olmo_core_end_to_end.py.
"""

import gzip
import json
import os
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
    out = tmp_path / "tokens"
    paths = write_token_files(inputs, str(out))
    written = {path: os.stat(path).st_mtime_ns for path in paths}
    assert write_token_files(inputs, str(out)) == paths  # complete: nothing to do, nothing rewritten
    assert {path: os.stat(path).st_mtime_ns for path in paths} == written
    with pytest.raises(ValueError, match=r"other settings \(dtype 'uint16' \(now 'uint32'\)\)"):
        write_token_files(inputs, str(out), dtype="uint32")
    (out / "manifest.json").unlink()
    with pytest.raises(ValueError, match="already holds token files .* and no manifest.json"):
        write_token_files(inputs, str(out))
    with pytest.raises(ValueError, match="not found: .*missing.txt"):
        write_token_files([str(tmp_path / "missing.txt")], str(tmp_path / "other"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 2: expected a JSON object with a 'text' key"):
        write_token_files([str(bad)], str(tmp_path / "third"))
    assert not list((tmp_path / "third").glob("*.npy*"))


def _many_inputs(tmp_path, count=9):
    """``count`` small inputs (text and gzipped JSONL, 0.3-2 kB each) and the token stream they make, EOS 0 after each document."""
    folder = tmp_path / "many"
    folder.mkdir()
    inputs, expected = [], []
    for i in range(count):
        if i % 3 == 2:
            path = folder / f"{i}.jsonl.gz"
            documents = [f"file {i} doc {j} " * (3 + j) for j in range(1 + i)]
            with gzip.open(path, "wt") as file:
                file.writelines(json.dumps({"text": text}) + "\n" for text in documents)
        else:
            path = folder / f"{i}.txt"
            documents = [f"plain file {i} " * (20 + 10 * i)]
            path.write_text(documents[0])
        inputs.append(str(path))
        for text in documents:
            expected += list(text.encode()) + [0]
    return inputs, expected


def _files(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.name.endswith(".npy")}


def test_parallel_prepare_data_writes_the_single_process_files_byte_for_byte(tmp_path):
    import hashlib

    inputs, expected = _many_inputs(tmp_path)
    single = write_token_files(inputs, str(tmp_path / "one"), tokens_per_file=200)
    parallel = write_token_files(inputs, str(tmp_path / "three"), tokens_per_file=200, workers=3)
    assert [os.path.basename(path) for path in parallel] == [os.path.basename(path) for path in single]
    assert _files(tmp_path / "three") == _files(tmp_path / "one")
    assert np.concatenate([np.fromfile(path, dtype=np.uint16) for path in parallel]).tolist() == expected
    manifest = json.loads((tmp_path / "three/manifest.json").read_text())
    assert manifest["complete"] and len(manifest["units"]) >= 4 and len(manifest["shards"]) > len(manifest["units"])
    assert [unit["unit"] for unit in manifest["done"]] == list(range(len(manifest["units"])))
    for shard in manifest["shards"]:
        data = (tmp_path / "three" / shard["path"]).read_bytes()
        assert shard["tokens"] == len(data) // 2 and shard["sha256"] == hashlib.sha256(data).hexdigest()
    assert sum(shard["tokens"] for shard in manifest["shards"]) == len(expected)
    # a shard is at least tokens_per_file long unless it ends its unit
    last_of_unit = {max(k for k, s in enumerate(manifest["shards"]) if s["unit"] == u) for u in range(len(manifest["units"]))}
    assert all(s["tokens"] >= 200 for k, s in enumerate(manifest["shards"]) if k not in last_of_unit)
    assert not list((tmp_path / "three").glob("*.partial"))


def test_an_interrupted_prepare_data_resumes_where_it_stopped(tmp_path, monkeypatch):
    import olmoe_gatepro.data as data

    inputs, expected = _many_inputs(tmp_path)
    clean = write_token_files(inputs, str(tmp_path / "clean"), tokens_per_file=200)
    broken = tmp_path / "many/5.jsonl.gz"
    good = broken.read_bytes()
    with gzip.open(broken, "wt") as file:
        file.write("not json\n")
    out = tmp_path / "resumed"
    with pytest.raises(ValueError, match="5.jsonl.gz, line 1: expected a JSON object"):
        write_token_files(inputs, str(out), tokens_per_file=200)
    manifest = json.loads((out / "manifest.json").read_text())
    done = len(manifest["done"])
    assert 0 < done < len(manifest["units"]) and not manifest["complete"]
    before = {name: os.stat(out / name).st_mtime_ns for name in _files(out)}
    assert set(before) == {shard["path"] for shard in manifest["shards"]}
    (out / "unit-00007-00000.npy.partial").write_bytes(b"left by a killed worker")
    broken.write_bytes(good)
    tokenised = []
    real = data._tokenise_unit
    monkeypatch.setattr(data, "_tokenise_unit", lambda unit, *rest: tokenised.append(unit) or real(unit, *rest))
    resumed = write_token_files(inputs, str(out), tokens_per_file=200)
    assert tokenised == list(range(done, len(manifest["units"])))  # the finished units were not redone
    assert {name: os.stat(out / name).st_mtime_ns for name in before} == before
    assert [os.path.basename(path) for path in resumed] == [os.path.basename(path) for path in clean]
    assert _files(out) == _files(tmp_path / "clean")
    assert not list(out.glob("*.partial"))
    (tmp_path / "many/0.txt").write_text("edited after its tokens were written")
    with pytest.raises(ValueError, match="0.txt changed after its tokens were written"):
        write_token_files(inputs, str(tmp_path / "resumed"), tokens_per_file=200)


def test_check_token_files_on_good_files(tmp_path):
    from olmoe_gatepro.data import check_token_files

    inputs, expected = _many_inputs(tmp_path)
    paths = write_token_files(inputs, str(tmp_path / "tokens"), tokens_per_file=200)
    check = check_token_files([f"{tmp_path}/tokens/*.npy"], "uint16", vocab_size=256, tokens_per_step=64,
                              sequence_length=32)
    assert check.problems == [] and [entry["path"] for entry in check.files] == paths
    assert check.tokens == len(expected)
    usable = sum(np.fromfile(path, dtype=np.uint16).size // 32 * 32 for path in paths)  # each file's whole windows
    assert check.usable_tokens == usable < len(expected) and check.steps == usable // 64
    assert f"{len(paths)} token file(s), {len(expected):,} tokens ({usable:,} in whole sequences), {usable // 64:,}" \
        in check.summary()
    repeated = check_token_files(paths, "uint16", vocab_size=256, tokens_per_step=64, sequence_length=32,
                                 planned_steps=3 * check.steps)
    assert repeated.problems == [] and repeated.notes == [f"the run's {3 * check.steps:,} steps pass over these files 3.00 times (epochs)"]
    assert check_token_files(paths[:1], "uint16", 256, tokens_per_step=10**6).problems[0].endswith(
        "usable tokens do not fill one step of 1,000,000")
    wide = check_token_files(paths[:1], "uint32", vocab_size=256)
    assert wide.problems  # 2-byte ids read 4 at a time make ids far beyond 256
    assert check_token_files(["gs://bucket/*.npy"], "uint16", 256).notes == ["gs://bucket/*.npy: remote, not checked"]


def test_check_token_files_names_every_broken_file(tmp_path):
    from olmoe_gatepro.data import check_token_files

    good = tmp_path / "good.npy"
    np.arange(2, 200, dtype=np.uint16).tofile(good)
    (tmp_path / "odd.npy").write_bytes(b"\x01\x00\x02")
    np.save(tmp_path / "saved.npy", np.arange(10, dtype=np.uint16))
    np.arange(100, dtype=np.uint32).tofile(tmp_path / "wide.npy")
    paths = [str(good), str(tmp_path / "odd.npy"), str(tmp_path / "saved.npy"), str(tmp_path / "wide.npy"),
             str(tmp_path / "gone.npy"), f"{tmp_path}/none/*.npy"]
    check = check_token_files(paths, "uint16", vocab_size=256)
    assert check.problems == [
        f"{tmp_path}/gone.npy: no such file",
        f"{tmp_path}/none/*.npy: matches no file",
        f"{tmp_path}/odd.npy: 3 bytes is not a whole number of uint16 tokens",
        f"{tmp_path}/saved.npy: a numpy.save file with a header; OLMo-core reads raw token arrays "
        "(write it with ndarray.tofile, as prepare-data does)",
        f"{tmp_path}/wide.npy: every second uint16 is 0, as when uint32 ids are read as uint16: is the dtype uint32?",
    ]
    assert [entry["path"] for entry in check.files] == [str(good), str(tmp_path / "wide.npy")]
    assert check_token_files([str(good)], "uint16", vocab_size=150).problems == [
        f"{good}: token id 199 >= the vocabulary size 150 (another tokenizer, or another dtype?)"]
    assert check_token_files([str(good)], "uint16", vocab_size=100_278).problems[0].startswith(
        "dtype uint16 holds ids up to 65535, the vocabulary needs up to 100277: use uint32")
    assert "fits uint16" in check_token_files([str(tmp_path / "wide.npy")], "uint32", vocab_size=256).notes[0]
    assert check_token_files([str(good)], "uint16", vocab_size=256, eos_token_id=7).notes == []
    assert check_token_files([str(good)], "uint16", vocab_size=256, eos_token_id=0).notes == [
        f"{good}: no EOS id 0 in its first 198 tokens (documents end with one: were the files made with another EOS id?)"]


def test_prepare_and_check_data_commands(tmp_path, capsys):
    inputs, expected = _many_inputs(tmp_path)
    assert main(["prepare-data", *inputs, "--out", str(tmp_path / "tokens"), "--tokens-per-file", "300",
                 "--workers", "2"]) == 0
    assert "(manifest.json lists their tokens and checksums)" in capsys.readouterr().out
    config = ["--config", str(ROOT / "configs/tiny.yaml"), f"--data.paths=[{tmp_path}/tokens/*.npy]",
              "--train.global_batch_sequences=2", "--train.micro_batch_sequences=2"]
    assert main(["check-data", *config]) == 0
    manifest = json.loads((tmp_path / "tokens/manifest.json").read_text())
    usable = sum(shard["tokens"] // 64 * 64 for shard in manifest["shards"])
    out = capsys.readouterr().out
    assert f"{len(manifest['shards'])} token file(s), {len(expected):,} tokens ({usable:,} in whole sequences), " \
           f"{usable // 128:,} optimizer steps" in out and "epochs" in out  # tiny trains more steps than that
    assert main(["check-data", *config, f"--data.paths=[{tmp_path}/tokens/*.npy,{tmp_path}/gone.npy]"]) == 2
    assert f"problem: {tmp_path}/gone.npy: no such file" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stopped:
        main(["check-data", str(tmp_path / "tokens/part-00000.npy")])
    assert stopped.value.code == 2 and "give PATHS and --vocab-size, or --config" in capsys.readouterr().err


def test_prepared_tokens_feed_olmo_core_data_loader(tmp_path):
    assert main(["prepare-data", *_corpus(tmp_path), "--out", str(tmp_path / "tokens"), "--tokens-per-file", "4000"]) == 0
    from olmoe_gatepro.olmo_core.train import build_train_components

    run = load_run_config(
        str(ROOT / "configs/tiny.yaml"),
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
        [sys.executable, str(ROOT / "scripts/train.py"), str(ROOT / "configs/tiny.yaml"), "--model.top_k=99", "--dry-run"],
        capture_output=True, text=True,
    )
    assert bad.returncode == 2 and "tiny.yaml with overrides" in bad.stderr and "top_k (99)" in bad.stderr


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


@pytest.mark.parametrize("in_place", [False, True], ids=["full disk before the manifest", "Ctrl-C after it"])
def test_a_unit_stays_only_if_the_manifest_on_disk_records_it_and_the_rerun_finishes(tmp_path, monkeypatch, in_place):
    """The second unit's manifest write fails: before the manifest is in place (a full disk), the unit's named
    shards go; once it is in place (a Ctrl-C during the folder's fsync, say) they stay, as the manifest lists
    them. Either way the folder holds exactly what its manifest records, and the rerun ends with the clean
    run's files."""
    import olmoe_gatepro.jsonl as jsonl
    from olmoe_gatepro.jsonl import FileWriteError

    inputs, _ = _many_inputs(tmp_path)
    clean = write_token_files(inputs, str(tmp_path / "clean"), tokens_per_file=200)
    out = tmp_path / "cut"
    real, writes = jsonl.write_text_atomically, []
    failure = KeyboardInterrupt() if in_place else FileWriteError("the disk is full; nothing half-written was left")

    def second_write_fails(path, text):
        writes.append(path)
        if len(writes) == 2 and not in_place:
            raise failure
        real(path, text)
        if len(writes) == 2:
            raise failure

    monkeypatch.setattr(jsonl, "write_text_atomically", second_write_fails)
    with pytest.raises(type(failure)):
        write_token_files(inputs, str(out), tokens_per_file=200)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["done"]) == (2 if in_place else 1)
    assert set(_files(out)) == {shard["path"] for shard in manifest["shards"]} and not list(out.glob("*.partial"))
    monkeypatch.setattr(jsonl, "write_text_atomically", real)
    assert [os.path.basename(path) for path in write_token_files(inputs, str(out), tokens_per_file=200)] == \
        [os.path.basename(path) for path in clean]
    assert _files(out) == _files(tmp_path / "clean")
