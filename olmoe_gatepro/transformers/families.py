"""The transformers MoE families GatePro serves, and those it refuses, in one table.

GatePro needs a bias-free linear router whose top-k choice is made on a softmax over all N
expert logits: then penalising a logit is exactly what the paper does. In transformers 5 each
such family has a ``<Family>TopKRouter`` holding ``weight`` (N, d), ``top_k`` and
``num_experts``; the families differ only in how the chosen experts' weights are finished:

- ``renormalise``: ``"config"`` (divide by their sum where the config says ``norm_topk_prob``),
  ``"always"`` or ``"never"``;
- ``weights_dtype``: ``"logits"`` (the model's dtype, as the logits), or ``"float32"``.

Shared experts (Qwen2-MoE) sit outside the router and are untouched.
"""

import importlib
from dataclasses import dataclass

__all__ = ["RouterFamily", "FAMILIES", "REFUSED", "router_class", "family_of_class"]


@dataclass(frozen=True)
class RouterFamily:
    """Where a family's router class lives and how it turns penalised logits into expert weights."""

    module: str
    class_name: str
    renormalise: str  # "config", "always" or "never"
    weights_dtype: str  # "logits" or "float32"


FAMILIES = {
    "olmoe": RouterFamily("transformers.models.olmoe.modeling_olmoe", "OlmoeTopKRouter", "config", "logits"),
    "qwen2_moe": RouterFamily("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeTopKRouter", "config", "logits"),
    "qwen3_moe": RouterFamily("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeTopKRouter", "config", "logits"),
    "flex_olmo": RouterFamily("transformers.models.flex_olmo.modeling_flex_olmo", "FlexOlmoTopKRouter", "config", "logits"),
    "mixtral": RouterFamily("transformers.models.mixtral.modeling_mixtral", "MixtralTopKRouter", "always", "float32"),
}

# Router classes GatePro does not fit, by class name, with the reason a user is told.
REFUSED = {
    "DeepseekV3TopkRouter": "DeepSeek-V3 scores experts with a sigmoid plus a correction bias and chooses within "
                            "expert groups; GatePro's penalty assumes a softmax top-k over all experts",
    "PhimoeTopKRouter": "PhiMoE's router samples experts (sparsemixer); GatePro assumes a deterministic top-k",
}


def router_class(family: str) -> type:
    """The router class of ``family`` (importing its modeling module)."""
    spec = FAMILIES[family]
    return getattr(importlib.import_module(spec.module), spec.class_name)


def family_of_class(cls: type) -> str | None:
    """The family whose router class is ``cls`` (by module and name, without importing the others)."""
    for family, spec in FAMILIES.items():
        if cls.__module__ == spec.module and cls.__name__ == spec.class_name:
            return family
    return None
