"""Crash-safe files: JSON lines appended whole, and files replaced atomically.

A record file is read line by line; a last line without its newline was cut short by a crash
and is dropped. ``repair`` rewrites the file without it (atomically) before anything is
appended, so a new line is never glued to a broken one.
"""

import json
import os

__all__ = ["read_records", "append_record", "rewrite_records", "repair", "drop_after_step", "write_text_atomically"]


def read_records(path: str) -> list[dict]:
    """The complete lines of a JSONL file (none if it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as file:
        return [json.loads(line) for line in file if line.endswith("\n")]


def append_record(path: str, record: dict) -> None:
    """Append one JSON line and fsync it (creating the file's folder if needed)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()
        os.fsync(file.fileno())


def write_text_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path.partial``, fsync, then rename over ``path``."""
    partial = f"{path}.partial"
    with open(partial, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)


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


def drop_after_step(path: str, step: int) -> None:
    """On resuming from ``step``: keep the complete records of steps up to it (a no-op without the file)."""
    if os.path.exists(path):
        rewrite_records(path, [record for record in read_records(path) if record["step"] <= step])
