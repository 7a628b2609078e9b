"""Which torch device a command runs on, checked against what this machine has.

``cpu``, ``cuda`` or ``cuda:N`` (N below the number of visible GPUs); None picks ``cuda`` when
a GPU is visible, else ``cpu``. Anything else, or a GPU this machine does not have, is a
ValueError naming the value, so that a run never falls back to the CPU while recording "cuda".
"""

import re

__all__ = ["resolve_device", "out_of_memory"]

_DEVICE = re.compile(r"(?P<kind>cpu|cuda)(:(?P<index>\d+))?")


def resolve_device(requested: str | None, origin: str = "--device") -> str:
    """The device to run on: ``requested``, checked, or the default; errors name ``origin`` and the value."""
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested is None:
        return "cuda" if visible else "cpu"
    match = _DEVICE.fullmatch(requested.strip().lower()) if isinstance(requested, str) else None
    if match is None:
        raise ValueError(f"{origin} {requested!r}: expected cpu, cuda or cuda:N")
    if match["kind"] == "cpu":
        if match["index"] not in (None, "0"):
            raise ValueError(f"{origin} {requested!r}: the CPU has no index other than 0; use cpu")
        return "cpu"
    if not visible:
        raise ValueError(f"{origin} {requested}: no CUDA GPU is visible on this machine (use cpu)")
    if match["index"] is not None and int(match["index"]) >= visible:
        raise ValueError(f"{origin} {requested}: this machine has {visible} visible CUDA GPU(s), cuda:0 to "
                         f"cuda:{visible - 1}")
    return "cuda" if match["index"] is None else f"cuda:{int(match['index'])}"


_CPU_ALLOCATION = re.compile(r"can't allocate memory: you tried to allocate (?P<bytes>\d+) bytes")


def out_of_memory(error: BaseException) -> str | None:
    """One line for a failed allocation (torch's CPU allocator, CUDA, or Python's MemoryError); else None."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        first = str(error).strip().splitlines()[0] if str(error).strip() else "CUDA out of memory"
        return f"out of GPU memory ({first.split('. ')[0]}); choose smaller sizes (batch, sequence length, model)"
    match = _CPU_ALLOCATION.search(str(error)) if isinstance(error, RuntimeError) else None
    if match is not None:
        return (f"out of memory: the run tried to allocate {int(match['bytes']) / 1e9:.1f} GB at once; choose "
                "smaller sizes (batch, sequence length, model)")
    if isinstance(error, MemoryError):
        return "out of memory; choose smaller sizes (batch, sequence length, model)"
    return None
