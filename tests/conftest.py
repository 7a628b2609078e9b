"""Set-up for the whole test session.

Without CUDA, OLMo-core's MoE kernels run through Triton's interpreter (``olmoe_gatepro.olmo_core.cpu``).
Triton reads ``TRITON_INTERPRET`` when those kernels are imported, so it is set here, before
any test imports OLMo-core; subprocesses inherit it.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import presets  # noqa: E402  (tests/ is on the path: pyproject's pythonpath)

presets.register()
