"""Crash-safe files: JSON lines appended whole, files replaced atomically, and strict readers.

A record file is read line by line; a last line without its newline was cut short by a crash
and is dropped. ``repair`` rewrites the file without it (atomically) before anything is
appended, so a new line is never glued to a broken one.

Writing never leaves half a file: ``atomic_file`` writes a hidden temporary file in the same
folder, fsyncs it and renames it over the target, and removes it on any error; a failed append
truncates the file back to what it held. A write that fails raises ``FileWriteError``, one line
naming the path and why (``the disk is full`` for ENOSPC). Reading text that is not UTF-8, or a
line that is not JSON, is a ``ValueError`` naming the file and the line. Also here, for every
run folder: ``keep_settings`` (a rerun with other settings is refused, the keys named) and
``folder_lock`` (a second run into a folder in use is refused).
"""

import contextlib
import errno
import json
import os
import re
import secrets
from collections.abc import Iterator

__all__ = ["FileWriteError", "write_error", "os_error_of", "read_text", "read_json", "read_records",
           "read_step_records", "append_record", "rewrite_records", "repair", "drop_after_step", "atomic_file",
           "write_text_atomically", "keep_settings", "read_settings", "differing_settings", "FolderBusyError",
           "folder_lock"]

_WHY = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted (the disk is full for this user)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied (the folder is not writable)",
    errno.EPERM: "permission denied (the folder is not writable)",
}


class FileWriteError(OSError):
    """Writing ``filename`` failed; ``str()`` is one line naming it and why, e.g. that the disk is full."""

    def __str__(self) -> str:
        return f"{self.filename}: cannot write: {self.strerror}; nothing half-written was left"


def write_error(error: OSError, path: str) -> FileWriteError:
    """``error`` (from writing ``path``) as a ``FileWriteError`` whose message says why in words.

    A short write without an errno (numpy's ``tofile`` raises those) on a disk with under 1 MiB
    left is a full disk too.
    """
    if isinstance(error, FileWriteError):
        return error
    code = error.errno
    if code is None and _free_bytes(path) < 2**20:
        code = errno.ENOSPC
    return FileWriteError(code, _WHY.get(code, error.strerror or str(error)), path)


_RUST_IO_ERROR = re.compile(r"I/O error: (?P<text>.*?) \(os error (?P<errno>\d+)\)")


def os_error_of(error: BaseException) -> OSError | None:
    """``error`` as an OSError: itself, or one that a Rust library (safetensors, tokenizers) reported in its
    message as ``I/O error: ... (os error N)``; None for any other error."""
    if isinstance(error, OSError):
        return error
    match = _RUST_IO_ERROR.search(str(error))
    return OSError(int(match["errno"]), match["text"]) if match else None


def _free_bytes(path: str) -> float:
    try:
        stats = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return float("inf")
    return stats.f_bavail * stats.f_frsize


def _line_of(raw: bytes, position: int) -> int:
    return raw[:position].count(b"\n") + 1


def read_text(path: str) -> str:
    """The UTF-8 text of ``path``; a ValueError naming the file and line of the first byte that is not UTF-8.

    A missing or unreadable file is the OSError ``open`` raises.
    """
    with open(path, "rb") as file:
        raw = file.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}, line {_line_of(raw, error.start)}: not UTF-8 text (byte 0x{raw[error.start]:02x} "
                         "cannot be decoded)") from None


def read_json(path: str):
    """The JSON document in ``path``; a ValueError naming the file, line and column of a syntax error."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {error.lineno}, column {error.colno}: not valid JSON ({error.msg})") from None


def _records(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) of each complete line of a JSONL file; a garbled line is a ValueError naming it."""
    lines = read_text(path).split("\n")
    for number, line in enumerate(lines[:-1], start=1):  # the last piece is empty, or a line cut short: dropped
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not a JSON record ({error.msg}, column {error.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def read_records(path: str) -> list[dict]:
    """The complete lines of a JSONL file (none if it does not exist)."""
    if not os.path.exists(path):
        return []
    return [record for _, record in _records(path)]


def append_record(path: str, record: dict) -> None:
    """Append one JSON line and fsync it (creating the file's folder if needed).

    If the write fails (a full disk), the file is cut back to what it held and a
    ``FileWriteError`` is raised.
    """
    data = memoryview((json.dumps(record) + "\n").encode("utf-8"))
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            size = os.fstat(descriptor).st_size
            try:
                while data:
                    data = data[os.write(descriptor, data):]
                os.fsync(descriptor)
            except OSError:
                os.ftruncate(descriptor, size)
                raise
        finally:
            os.close(descriptor)
    except OSError as error:
        raise write_error(error, path) from None


@contextlib.contextmanager
def atomic_file(path: str, binary: bool = False):
    """A file object whose content replaces ``path`` when the block ends, or is discarded on any error.

    It is a hidden temporary file in ``path``'s folder (``.<name>.<random>.partial``), fsynced and
    renamed over ``path``; an OSError while writing becomes a ``FileWriteError`` naming ``path``.
    """
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.partial")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as error:
        raise write_error(error, path) from None
    try:
        with os.fdopen(descriptor, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise write_error(error, path) from None
        raise
    with contextlib.suppress(OSError):  # the rename itself survives a crash once the folder is synced
        folder_descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(folder_descriptor)
        finally:
            os.close(folder_descriptor)


def write_text_atomically(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically (``atomic_file``)."""
    with atomic_file(path) as file:
        file.write(text)


def rewrite_records(path: str, records: list[dict]) -> None:
    """Replace the file with exactly ``records``, atomically."""
    write_text_atomically(path, "".join(json.dumps(record) + "\n" for record in records))


def repair(path: str) -> list[dict]:
    """Drop a cut-short last line, if any; return the complete records."""
    records = read_records(path)
    if os.path.exists(path):
        with open(path, "rb") as file:
            file.seek(0, os.SEEK_END)
            size = file.tell()
            if size:
                file.seek(size - 1)
                if file.read(1) != b"\n":
                    rewrite_records(path, records)
    return records


def read_step_records(path: str) -> list[dict]:
    """The complete records of a metrics file, each with an integer ``step``; a line without one is
    a ValueError naming it. None (an empty list) when the file does not exist."""
    if not os.path.exists(path):
        return []
    records = []
    for number, record in _records(path):
        if isinstance(record.get("step"), bool) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}, line {number}: expected a record with an integer 'step'")
        records.append(record)
    return records


def drop_after_step(path: str, step: int) -> None:
    """On resuming from ``step``: keep the complete records of steps up to it (a no-op without the file)."""
    if os.path.exists(path):
        rewrite_records(path, [record for record in read_step_records(path) if record["step"] <= step])


def _flattened(value, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists, scalars and empty dicts are leaves."""
    if not (isinstance(value, dict) and value):
        return {prefix: value}
    leaves = {}
    for name, item in value.items():
        leaves.update(_flattened(item, f"{prefix}.{name}" if prefix else str(name)))
    return leaves


def differing_settings(recorded: dict, settings: dict) -> list[str]:
    """``"key: <recorded> there, <new> now"`` for every (dotted) key whose value differs, sorted."""
    old, new = _flattened(recorded), _flattened(settings)

    def shown(values: dict, key: str) -> str:
        return repr(values[key]) if key in values else "absent"

    return [f"{key}: {shown(old, key)} there, {shown(new, key)} now"
            for key in sorted(old.keys() | new.keys()) if (key in old, old.get(key)) != (key in new, new.get(key))]


def read_settings(path: str, folder_flag: str = "--out") -> dict | None:
    """The JSON object in ``path`` (None when there is no such file); a ValueError naming it when unreadable."""
    if not os.path.exists(path):
        return None
    try:
        recorded = read_json(path)
    except OSError as error:
        raise ValueError(f"{path}: cannot be read ({error.strerror}); remove it, or use another {folder_flag}") from None
    except ValueError as error:  # not UTF-8, or not JSON: the message names the file and line
        raise ValueError(f"{error}; remove it, or use another {folder_flag}") from None
    if not isinstance(recorded, dict):
        raise ValueError(f"{path}: expected a JSON object of settings; remove it, or use another {folder_flag}")
    return recorded


def keep_settings(path: str, settings: dict, folder_flag: str = "--out", write: bool = True) -> None:
    """Record ``settings`` (JSON-ready) in ``path``, or check that they are the ones recorded there.

    Raises ``ValueError`` naming every differing key (dotted, ``run.seed``) with the recorded and
    the new value, or naming ``path`` when it is not readable JSON; nothing is written then.
    ``write=False`` only checks (call it again with ``write=True`` once the run is about to start).
    """
    settings = json.loads(json.dumps(settings))
    recorded = read_settings(path, folder_flag)
    if recorded is None:
        if write:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            write_text_atomically(path, json.dumps(settings, indent=2))
        return
    differing = differing_settings(recorded, settings)
    if differing:
        folder = os.path.dirname(path) or "."
        raise ValueError(f"{folder_flag} {folder} holds a run with other settings ({path}): {'; '.join(differing)}; "
                         f"rerun with the recorded settings, or use another {folder_flag}")


class FolderBusyError(RuntimeError):
    """Another run holds the folder (its ``folder_lock``)."""


@contextlib.contextmanager
def folder_lock(folder: str, what: str, folder_flag: str = "--out"):
    """Hold ``folder`` (created if needed) for one run of ``what``; another run into it meanwhile is refused.

    The lock is ``fcntl.flock`` on ``<folder>/.<what>.lock``, released with the file handle, also
    when the process dies. A second holder gets a ``FolderBusyError`` naming the folder. A folder
    this call created and that holds nothing but the lock afterwards (the run failed early) is
    removed again.
    """
    import fcntl

    created = not os.path.exists(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise write_error(error, folder) from None
    path = os.path.join(folder, f".{what}.lock")
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusyError(f"another {what} run holds {folder_flag} {folder} (lock {path}); wait for it to "
                                  f"end, or use another {folder_flag}") from None
        try:
            yield
        finally:
            if created and os.listdir(folder) == [os.path.basename(path)]:
                os.unlink(path)
                os.rmdir(folder)
