"""Crash-safe files: JSON lines appended whole, and files replaced atomically.

A record file is read line by line; a last line without its newline was cut short by a crash
and is dropped. ``repair`` rewrites the file without it (atomically) before anything is
appended, so a new line is never glued to a broken one. ``keep_settings`` records a run
folder's settings once and refuses a rerun into that folder with other settings.
"""

import json
import os

__all__ = ["read_records", "append_record", "rewrite_records", "repair", "drop_after_step", "write_text_atomically",
           "keep_settings", "read_settings", "differing_settings"]


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
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not readable JSON ({error}); remove it, or use another {folder_flag}") from None


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
