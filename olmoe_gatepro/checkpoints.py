"""Recognise and find checkpoints, without importing a framework.

A model argument is a Hugging Face folder (``config.json``), an OLMo-core checkpoint (a step
folder ``stepN`` or a save folder holding some), or a hub id ``owner/name``. A step folder is
complete when OLMo-core has written the files its ``dir_is_checkpoint`` checks.
"""

import json
import os
import re

from olmoe_gatepro.jsonl import read_json

__all__ = ["is_complete_checkpoint", "complete_steps", "find_checkpoint", "model_kind", "check_model_files",
           "cannot_load"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100_000_000  # bytes; a safetensors header of a 1T-parameter model is far smaller

STEP_FOLDER = re.compile(r"step(?P<step>\d+)")


def is_complete_checkpoint(step_folder: str) -> bool:
    """Whether OLMo-core finished writing the checkpoint in ``step_folder``."""
    return all(os.path.isfile(os.path.join(step_folder, *parts))
               for parts in (("model_and_optim", ".metadata"), ("train", "rank0.pt"), (".metadata.json",)))


def complete_steps(save_folder: str) -> list[int]:
    """The steps N of the complete ``stepN`` folders in ``save_folder``, ascending."""
    return sorted(int(match["step"]) for name in os.listdir(save_folder)
                  if (match := STEP_FOLDER.fullmatch(name)) and is_complete_checkpoint(os.path.join(save_folder, name)))


def find_checkpoint(path: str) -> tuple[str, int]:
    """The step folder (``.../stepN``) and step of ``path``: a step folder, or a save folder's latest."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path}: no such folder")
    if os.path.exists(os.path.join(path, "model_and_optim", ".metadata")):
        step_dir = path
    else:
        steps = complete_steps(path)
        if not steps:
            raise FileNotFoundError(f"{path} holds no OLMo-core checkpoint (no complete stepN folder)")
        step_dir = os.path.join(path, f"step{steps[-1]}")
    match = STEP_FOLDER.fullmatch(os.path.basename(os.path.normpath(step_dir)))
    if match is None:
        raise ValueError(f"checkpoint {step_dir}: expected a folder named stepN")
    return step_dir, int(match["step"])


def model_kind(model: str) -> str:
    """``"hf"``, ``"olmo-core"`` or ``"hub"``; a ValueError naming ``model`` when it is none of them."""
    if os.path.isdir(model):
        # An OLMo-core step folder may hold a config.json too (OLMo-core's ConfigSaverCallback writes one).
        if os.path.exists(os.path.join(model, "config.json")) and not os.path.exists(
                os.path.join(model, "model_and_optim", ".metadata")):
            return "hf"
        try:
            find_checkpoint(model)
        except (FileNotFoundError, ValueError):
            raise ValueError(f"model {model}: a folder with neither a config.json (Hugging Face) nor an "
                             "OLMo-core checkpoint (stepN/model_and_optim)") from None
        return "olmo-core"
    if os.path.exists(model):
        raise ValueError(f"model {model}: a file, not a model folder or hub id")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model) or os.path.isdir(model.split("/")[0]):
        raise ValueError(f"model {model}: no such folder (nor a hub id of the form owner/name)")
    return "hub"


def _check_safetensors(path: str) -> None:
    """A ValueError naming ``path`` when it is not a complete safetensors file (header and data, by size)."""
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        prefix = file.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: not a complete safetensors file ({size} bytes; cut short, or another format)")
        try:
            header = json.loads(file.read(length))
            end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"),
                      default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ValueError(f"{path}: not a safetensors file (its header is not a safetensors index)") from None
    if 8 + length + end > size:
        raise ValueError(f"{path} is cut short: {size} bytes where its header needs {8 + length + end} "
                         "(an interrupted download or copy?)")


def check_model_files(model: str) -> None:
    """For a local Hugging Face folder: a ValueError naming the file that is not valid JSON, or the
    weight file that is missing or cut short.

    Checks ``config.json`` and the safetensors files (``model.safetensors``, or the shards its index lists) by their
    headers and sizes, reading no tensor. A hub id, or a folder of another weight format, is
    left to ``from_pretrained``.
    """
    config = os.path.join(model, "config.json")
    if not os.path.isfile(config):
        return
    if not isinstance(read_json(config), dict):
        raise ValueError(f"{config}: expected a JSON object (a model config)")
    index = os.path.join(model, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        content = read_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise ValueError(f"{index}: expected a safetensors index with a weight_map of file names")
        names = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(model, "model.safetensors")):
        names = ["model.safetensors"]
    else:
        return
    for name in names:
        path = os.path.join(model, name)
        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing ({SAFETENSORS_INDEX} lists it)")
        _check_safetensors(path)


def cannot_load(model: str, error: Exception) -> ValueError:
    """The one-line error for a model that ``from_pretrained`` could not load."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ValueError(f"model {model}: cannot be loaded ({first_line})")
