"""GatePro for transformers' OLMoE (``OlmoeTopKRouter``), patched at run time.

``patch_transformers()`` replaces ``OlmoeTopKRouter.forward`` so every OLMoE router, of models
already built and built later, routes with GatePro; ``patch_transformers(model=m)`` patches only
the routers of ``m``. ``unpatch_transformers()`` restores the stock forward everywhere.

The patched router returns, like the stock one, ``(router_logits, top_k_weights, top_k_index)``
in the stock dtypes: the choice and the weights come from the penalised logits in float32
(softmax over all N, then top-k, renormalised only where the config says ``norm_topk_prob``);
``router_logits`` are those penalised logits cast back to the model's dtype, as stock returns
them, so what transformers records for the load-balancing loss and ``output_router_logits``
agrees with the experts chosen (in a bf16 model a penalty below bf16's spacing is chosen with
but does not survive that cast, exactly as stock precision would have it). With GatePro
disabled, or a router with a single expert, the stock forward runs unchanged.
"""

import types

import torch
import torch.nn.functional as F
from torch import nn

from olmoe_gatepro.core.config import GateProConfig
from olmoe_gatepro.core.router_state import (
    SETTINGS_ATTR,
    refresh_partners,
    route,
    routers_with_instance_state,
    set_instance_settings,
    strip_instance_state,
)

__all__ = ["SUPPORTED_TRANSFORMERS", "patch_transformers", "unpatch_transformers", "olmoe_routers", "class_gatepro"]

SUPPORTED_TRANSFORMERS = ">=5.23,<6"
_stock_forward = None


def _router_class() -> type:
    """transformers' ``OlmoeTopKRouter``, after checking the installed version is supported."""
    import transformers
    from packaging.specifiers import SpecifierSet

    if transformers.__version__ not in SpecifierSet(SUPPORTED_TRANSFORMERS):
        raise RuntimeError(
            f"olmoe-gatepro's transformers patch supports transformers {SUPPORTED_TRANSFORMERS}; "
            f"installed is {transformers.__version__}"
        )
    from transformers.models.olmoe import modeling_olmoe

    return modeling_olmoe.OlmoeTopKRouter


def _gatepro_router_forward(self, hidden_states: torch.Tensor):
    if not getattr(self, SETTINGS_ATTR).enabled or self.num_experts < 2:
        return _stock_forward(self, hidden_states)
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    raw_logits = F.linear(hidden_states, self.weight)
    routed = route(self, raw_logits)  # float32
    router_probs = F.softmax(routed, dim=-1)
    top_k_weights, top_k_index = torch.topk(router_probs, self.top_k, dim=-1)
    if self.norm_topk_prob:
        top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
    router_logits = routed
    if raw_logits.dtype != routed.dtype:
        # Branch off the raw logits, as stock's are, so that the gradients of the auxiliary loss
        # and of the softmax meet in the model's dtype, where stock sums them; the penalty is a
        # detached constant.
        router_logits = raw_logits - (raw_logits.float() - routed).detach().to(raw_logits.dtype)
    return router_logits, top_k_weights.to(raw_logits.dtype), top_k_index


def class_gatepro() -> GateProConfig | None:
    """The class-wide settings in force (``patch_transformers()`` or ``OLMOE_GATEPRO=1``), else None."""
    router_class = _router_class()  # importing it runs the environment hook, if one is installed
    return router_class.__dict__.get(SETTINGS_ATTR)


def olmoe_routers(model: nn.Module) -> list[nn.Module]:
    """The ``OlmoeTopKRouter`` modules of ``model``, in module order."""
    router_class = _router_class()
    return [module for module in model.modules() if isinstance(module, router_class)]


def patch_transformers(
    model: nn.Module | None = None, config: GateProConfig | None = None, **settings
) -> None:
    """Route transformers' OLMoE with GatePro.

    Args:
        model: patch only this model's routers; None patches the router class, which covers
            every model, built before or after the call.
        config: the GatePro settings; keyword ``settings`` (``penalty=1e-3``, ...) override it.

    Calling it again only updates the settings.
    """
    global _stock_forward
    router_class = _router_class()
    gatepro = (config or GateProConfig()).replace(**settings)
    if _stock_forward is None:
        _stock_forward = router_class.forward
    if model is None:
        router_class.forward = _gatepro_router_forward
        setattr(router_class, SETTINGS_ATTR, gatepro)
        return
    routers = olmoe_routers(model)
    if not routers:
        raise ValueError(f"{type(model).__name__} has no OlmoeTopKRouter to patch")
    for router in routers:
        router.forward = types.MethodType(_gatepro_router_forward, router)
        set_instance_settings(router, gatepro)
    if gatepro.partner_refresh_steps is not None:
        refresh_partners(model)


def unpatch_transformers(model: nn.Module | None = None) -> None:
    """Restore stock routing.

    With ``model``: remove what ``patch_transformers(model=model)`` and ``set_gatepro`` set on
    its routers (a class-wide patch, if any, still applies to it). With None: restore the
    class's stock forward and strip every instance patch, so all models route as stock.
    """
    global _stock_forward
    router_class = _router_class()
    routers = olmoe_routers(model) if model is not None else routers_with_instance_state(router_class)
    for router in routers:
        strip_instance_state(router, "forward")
    if model is None and _stock_forward is not None:
        router_class.forward = _stock_forward
        if SETTINGS_ATTR in router_class.__dict__:
            delattr(router_class, SETTINGS_ATTR)
        _stock_forward = None
