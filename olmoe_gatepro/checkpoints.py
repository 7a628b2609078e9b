"""Recognise and find checkpoints, without importing a framework.

A model argument is a Hugging Face folder (``config.json``), an OLMo-core checkpoint (a step
folder ``stepN`` or a save folder holding some), or a hub id ``owner/name``. A step folder is
complete when OLMo-core has written the files its ``dir_is_checkpoint`` checks.
"""

import os
import re

__all__ = ["is_complete_checkpoint", "complete_steps", "find_checkpoint", "model_kind", "cannot_load"]

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


def cannot_load(model: str, error: Exception) -> ValueError:
    """The one-line error for a model that ``from_pretrained`` could not load."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ValueError(f"model {model}: cannot be loaded ({first_line})")
