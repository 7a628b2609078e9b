"""Run OLMo-core's MoE layers on a machine without CUDA, through Triton's interpreter.

OLMo-core's dropless MoE moves tokens to and from experts with Triton kernels
(``olmo_core.kernels.moe``). With ``TRITON_INTERPRET=1`` Triton runs those same kernels with
NumPy on CPU tensors: exact, but slow (seconds a step for a tiny model), so this is for tests,
tiny runs and checkpoint conversion, never for real training. It needs the ``triton`` package
(Linux wheels on PyPI).

Call ``enable_cpu_moe()`` before anything imports OLMo-core's MoE code or ``triton.language``
(``transformers.Trainer`` does): Triton decides at import time whether a kernel, and the
``triton.language`` functions kernels call, are compiled or interpreted. A process that may need
it (the CLI) calls ``interpret_triton_without_cuda()`` before its other imports.
"""

import os
import sys

__all__ = ["enable_cpu_moe", "interpret_triton_without_cuda"]

_KERNELS = "olmo_core.kernels.moe"


def interpret_triton_without_cuda() -> None:
    """Without CUDA, have Triton interpret (``TRITON_INTERPRET=1``) unless it is set or ``triton.language`` loaded."""
    import torch

    if not torch.cuda.is_available() and "triton.language" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


def enable_cpu_moe() -> None:
    """Make OLMo-core's MoE kernels run on the CPU (Triton interpreter, one autotune config each).

    Raises ``RuntimeError`` if ``triton`` is missing, or if OLMo-core's kernels were already
    imported compiled (then the interpreter cannot take over in this process).
    """
    if _KERNELS not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    import olmo_core  # noqa: F401  (its absence is the [olmo-core] extra's error, not Triton's)

    try:
        import olmo_core.kernels.moe as kernels
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError as error:
        raise RuntimeError(
            f"OLMo-core's MoE on a CPU needs the 'triton' package ({error}); `pip install triton` "
            "(Linux), or run on a CUDA GPU"
        ) from None
    import triton.language

    autotuned = [value for value in vars(kernels).values() if isinstance(value, Autotuner)]
    interpreted = [kernel.fn for kernel in autotuned] + [triton.language.cdiv]  # cdiv: one the kernels call
    if not all(isinstance(function, InterpretedFunction) for function in interpreted):
        raise RuntimeError(
            f"{_KERNELS} or triton.language was imported before enable_cpu_moe() (or without TRITON_INTERPRET=1); "
            "call it first in the process, or set TRITON_INTERPRET=1 in the environment"
        )
    for kernel in autotuned:
        # The interpreter cannot benchmark; any one config computes the same result.
        kernel.configs = kernel.configs[:1]
