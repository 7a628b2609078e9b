"""Argument checks of the public API: a wrong type is a TypeError, a wrong value a ValueError.

Each message names the argument (``where``, e.g. ``"GateProConfig.penalty"``) and the value
given. Plain Python (no torch import: the start-up hook reads GateProConfig); the checks of
tensors' static properties live beside the math in ``core.gatepro``.
"""

import math
import numbers

__all__ = ["type_name", "check_bool", "check_int", "check_number", "refuse_renamed"]


def type_name(value) -> str:
    """``str``, ``NoneType``, ``torch.Tensor``, ... for messages."""
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__.split('.')[0]}.{kind.__qualname__}"


def check_bool(where: str, value) -> bool:
    """``value`` if it is a bool (not 1, not ``"yes"``); else a TypeError."""
    if not isinstance(value, bool):
        raise TypeError(f"{where} must be True or False; got {value!r} ({type_name(value)})")
    return value


def check_int(where: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int (a bool is not one) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where} must be an int; got {value!r} ({type_name(value)})")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = (f"in [{minimum}, {maximum}]" if minimum is not None and maximum is not None
                  else f">= {minimum}" if minimum is not None else f"<= {maximum}")
        raise ValueError(f"{where} must be an int {bounds}; got {value}")
    return value


def check_number(where: str, value, minimum: float | None = None) -> float:
    """``value`` (an int or float, not a bool or tensor) as a finite float >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must be a Python number; got {value!r} ({type_name(value)})")
    value = float(value)
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        bound = f" and >= {minimum:g}" if minimum is not None else ""
        raise ValueError(f"{where} must be finite{bound}; got {value!r}")
    return value


RENAMED_ARGUMENTS = {"metrics_interval": "metrics_interval_steps"}  # old keyword: OLMo-core's name, now ours


def refuse_renamed(where: str, given: dict) -> None:
    """Refuse ``given`` keywords: a renamed one with its new name, any other as Python would (TypeError)."""
    for name in given:
        if name in RENAMED_ARGUMENTS:
            raise TypeError(f"{where}: {name} is now {RENAMED_ARGUMENTS[name]} (the name OLMo-core's run configs use)")
        raise TypeError(f"{where} got an unexpected keyword argument {name!r}")
