"""The model and optimizer state of an OLMo-core checkpoint, for comparing two runs entry by entry."""

from pathlib import Path

import torch


def checkpoint_state(step_folder: Path) -> dict:
    """Every entry of ``step_folder/model_and_optim`` (unsharded, read with OLMo-core's reader) by its key."""
    from olmo_core.distributed.checkpoint import get_checkpoint_metadata, load_keys

    folder = step_folder / "model_and_optim"
    keys = sorted(get_checkpoint_metadata(folder).state_dict_metadata)
    return dict(zip(keys, load_keys(folder, keys)))


def assert_same_state(first: dict, second: dict) -> None:
    """Equal keys, tensors equal bit for bit, the rest equal."""
    assert first.keys() == second.keys() and any(key.startswith("optim.") for key in first)
    for key, value in first.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(second[key], value, rtol=0, atol=0, msg=key)
        else:
            assert second[key] == value, key
