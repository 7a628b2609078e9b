"""GatePro (arXiv 2510.13079) for OLMoE: the math, diversity metrics and framework patches."""

from olmoe_gatepro.config import GateProConfig
from olmoe_gatepro.gatepro import competition_partners, gatepro_logits
from olmoe_gatepro.olmo_core_patch import patch_olmo_core, unpatch_olmo_core
from olmoe_gatepro.router_state import gatepro_settings, refresh_partners, set_gatepro
from olmoe_gatepro.transformers_patch import patch_transformers, unpatch_transformers

__all__ = [
    "GateProConfig",
    "competition_partners",
    "gatepro_logits",
    "gatepro_settings",
    "patch_olmo_core",
    "patch_transformers",
    "refresh_partners",
    "set_gatepro",
    "unpatch",
    "unpatch_olmo_core",
    "unpatch_transformers",
]


def unpatch() -> None:
    """Undo every GatePro patch this package applied, restoring stock behaviour exactly."""
    unpatch_transformers()
    unpatch_olmo_core()
