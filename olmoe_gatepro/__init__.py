"""GatePro (arXiv 2510.13079) for OLMoE: the math, diversity metrics and framework patches.

The public names below are imported on first use, so that ``import olmoe_gatepro`` (and the
start-up hook that ``OLMOE_GATEPRO=1`` switches on) costs no torch import until GatePro is
actually needed.
"""

import importlib

_PUBLIC = {  # name: the module that defines it
    "GateProConfig": "olmoe_gatepro.core.config",
    "competition_partners": "olmoe_gatepro.core.gatepro",
    "gatepro_logits": "olmoe_gatepro.core.gatepro",
    "gatepro_settings": "olmoe_gatepro.core.router_state",
    "refresh_partners": "olmoe_gatepro.core.router_state",
    "set_gatepro": "olmoe_gatepro.core.router_state",
    "patch_olmo_core": "olmoe_gatepro.olmo_core.patch",
    "unpatch_olmo_core": "olmoe_gatepro.olmo_core.patch",
    "patch_transformers": "olmoe_gatepro.transformers.patch",
    "unpatch_transformers": "olmoe_gatepro.transformers.patch",
}

__all__ = sorted([*_PUBLIC, "unpatch"])


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'olmoe_gatepro' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


def unpatch() -> None:
    """Undo every GatePro patch this package applied, restoring stock behaviour exactly."""
    from olmoe_gatepro.olmo_core.patch import unpatch_olmo_core
    from olmoe_gatepro.transformers.patch import unpatch_transformers

    unpatch_transformers()
    unpatch_olmo_core()
