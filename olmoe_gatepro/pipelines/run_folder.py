"""A run folder of ``reproduce``: created if needed and held by one run at a time."""

import os

from olmoe_gatepro.jsonl import folder_lock

__all__ = ["ROUTING_FOLDER", "run_folder_lock"]

ROUTING_FOLDER = "routing"  # inspect's report, inside the report folder


def _make_run_folder(out_dir: str) -> None:
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir}: exists and is not a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out {out_dir}: cannot create the run folder ({error.strerror})") from None


def run_folder_lock(out_dir: str):
    """Hold ``out_dir`` for this run: a second reproduce into the same folder is refused while it runs."""
    _make_run_folder(out_dir)
    return folder_lock(out_dir, "reproduce")
