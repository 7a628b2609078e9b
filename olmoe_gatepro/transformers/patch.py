"""GatePro for transformers' MoE routers (OLMoE, Qwen2-MoE, Qwen3-MoE, FlexOlmo, Mixtral), patched at run time.

``patch_transformers()`` replaces the ``forward`` of every supported family's router class
(``families.FAMILIES``; ``families=[...]`` picks some), so every router of models already built
and built later routes with GatePro; ``patch_transformers(model=m)`` patches only the routers of
``m``, whatever their family. ``unpatch_transformers()`` restores the stock forwards everywhere.
A family whose routing GatePro does not fit (``families.REFUSED``) is refused with the reason.

The patched router returns, like the stock one, ``(router_logits, top_k_weights, top_k_index)``
in the stock dtypes: the choice and the weights come from the penalised logits in float32
(softmax over all N, then top-k, renormalised as the family does); ``router_logits`` are those
penalised logits in the model's dtype, as stock returns them, so what transformers records for
the load-balancing loss and ``output_router_logits`` agrees with the experts chosen (in a bf16
model a penalty below bf16's spacing is chosen with but does not survive that cast, exactly as
stock precision would have it). With GatePro disabled, or a router with a single expert, the
stock forward runs unchanged.
"""

import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from olmoe_gatepro.core.config import GateProConfig
from olmoe_gatepro.core.router_state import (
    SETTINGS_ATTR,
    check_module,
    is_recording,
    refresh_partners,
    restore_classes,
    route,
    routers_with_instance_state,
    set_instance_settings,
    settings_to_apply,
    strip_instance_state,
)
from olmoe_gatepro.transformers.families import FAMILIES, REFUSED, RouterFamily, family_of_class, router_class

__all__ = ["SUPPORTED_TRANSFORMERS", "patch_transformers", "unpatch_transformers", "olmoe_routers", "moe_routers",
           "class_gatepro"]

SUPPORTED_TRANSFORMERS = ">=5.23,<6"
_stock_forwards: dict[type, Callable] = {}  # router class -> its own forward


def _check_version() -> None:
    import transformers
    from packaging.specifiers import SpecifierSet

    if transformers.__version__ not in SpecifierSet(SUPPORTED_TRANSFORMERS):
        raise RuntimeError(
            f"olmoe-gatepro's transformers patch supports transformers {SUPPORTED_TRANSFORMERS}; "
            f"installed is {transformers.__version__}"
        )


def _gatepro_forward(stock: Callable, family: RouterFamily) -> Callable:
    def forward(self, hidden_states: torch.Tensor):
        if not getattr(self, SETTINGS_ATTR).enabled or self.num_experts < 2:
            if is_recording(self):  # tally what GatePro would change in the stock routing
                route(self, F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight).detach())
            return stock(self, hidden_states)
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        raw_logits = F.linear(hidden_states, self.weight)
        routed = route(self, raw_logits)  # float32
        top_k_weights, top_k_index = torch.topk(F.softmax(routed, dim=-1), self.top_k, dim=-1)
        if family.renormalise == "always" or (family.renormalise == "config" and self.norm_topk_prob):
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        if family.weights_dtype == "logits":
            top_k_weights = top_k_weights.to(raw_logits.dtype)
        router_logits = routed
        if raw_logits.dtype != routed.dtype:
            # Branch off the raw logits, as stock's are, so that the gradients of the auxiliary
            # loss and of the softmax meet in the model's dtype, where stock sums them; the
            # penalty is a detached constant.
            router_logits = raw_logits - (raw_logits.float() - routed).detach().to(raw_logits.dtype)
        return router_logits, top_k_weights, top_k_index

    forward.__wrapped__ = stock
    forward.__doc__ = "Stock routing from GatePro-penalised logits (float32), in the stock dtypes."
    return forward


def _stock_forward(router_class_: type) -> Callable:
    if router_class_ not in _stock_forwards:
        _stock_forwards[router_class_] = router_class_.forward
    return _stock_forwards[router_class_]


def _family(router: nn.Module) -> str | None:
    """The supported family of ``router``'s class or of a class it derives from; None if none."""
    for cls in type(router).__mro__:
        family = family_of_class(cls)
        if family is not None:
            return family
    return None


def _check_families(families) -> list[str]:
    """``families`` as a list of names: None is all of them, a single name is that one."""
    if families is None:
        return list(FAMILIES)
    names = [families] if isinstance(families, str) else families
    if not isinstance(names, (list, tuple, set, frozenset)) or not all(isinstance(name, str) for name in names):
        raise TypeError(f"families must be a family name or a list of them ({', '.join(FAMILIES)}); got {families!r}")
    if not names:
        raise ValueError(f"families is empty: nothing would be patched; give one or more of {', '.join(FAMILIES)}, "
                         "or None for all")
    names = list(names)
    unknown = [name for name in names if name not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown or unsupported famil{'ies' if len(unknown) > 1 else 'y'} {unknown}; "
                         f"supported: {', '.join(FAMILIES)}")
    return names


def class_gatepro() -> GateProConfig | None:
    """OLMoE's class-wide settings in force (``patch_transformers()`` or ``OLMOE_GATEPRO=1``), else None."""
    _check_version()
    cls = router_class("olmoe")  # importing it runs the environment hook, if one is installed
    return cls.__dict__.get(SETTINGS_ATTR)


def moe_routers(model: nn.Module) -> list[nn.Module]:
    """The routers of ``model`` of a supported family, in module order.

    A router GatePro does not fit is refused with the reason; a model without any MoE router
    of a known family gets an error naming the supported ones.
    """
    routers = [module for module in model.modules() if _family(module)]
    if routers:
        return routers
    refused = next((module for module in model.modules() if type(module).__name__ in REFUSED), None)
    if refused is not None:
        raise ValueError(f"{type(model).__name__}: GatePro does not apply: {REFUSED[type(refused).__name__]}")
    raise ValueError(f"{type(model).__name__} has no MoE router of a supported family ({', '.join(FAMILIES)})")


def olmoe_routers(model: nn.Module) -> list[nn.Module]:
    """The ``OlmoeTopKRouter`` modules of ``model``, in module order."""
    _check_version()
    cls = router_class("olmoe")
    return [module for module in model.modules() if isinstance(module, cls)]


def patch_transformers(
    model: nn.Module | None = None, config: GateProConfig | None = None, *, families=None, **settings
) -> None:
    """Route transformers' MoE routers with GatePro.

    Args:
        model: patch only this model's routers (its family is found from them); None patches
            the router classes of ``families``, which covers every model of them, built before
            or after the call.
        config: the GatePro settings; keyword ``settings`` (``penalty=1e-3``, ...) override it.
        families: with ``model=None``, the families to patch: a name or a list of names
            (default: all of ``FAMILIES``).

    Calling it again only updates the settings.
    """
    _check_version()
    gatepro = settings_to_apply("patch_transformers", config, settings)
    if model is not None:
        check_module("patch_transformers: model", model,
                     " (load it first, e.g. AutoModelForCausalLM.from_pretrained(path), or leave model=None "
                     "to patch every model)" if isinstance(model, str) else "")
    if model is None:
        for family in _check_families(families):
            cls = router_class(family)
            cls.forward = _gatepro_forward(_stock_forward(cls), FAMILIES[family])
            setattr(cls, SETTINGS_ATTR, gatepro)
        return
    if families is not None:
        raise ValueError("families picks router classes to patch; with model=..., the model's own routers are patched")
    for router in moe_routers(model):
        family = _family(router)
        forward = _gatepro_forward(_stock_forward(router_class(family)), FAMILIES[family])
        router.forward = types.MethodType(forward, router)
        set_instance_settings(router, gatepro)
    if gatepro.partner_refresh_steps is not None:
        refresh_partners(model)


def unpatch_transformers(model: nn.Module | None = None) -> None:
    """Restore stock routing.

    With ``model``: remove what ``patch_transformers(model=model)`` and ``set_gatepro`` set on
    its routers (a class-wide patch, if any, still applies to it). With None: restore every
    patched class's stock forward and strip every instance patch, so all models route as stock.
    """
    if model is not None:
        routers = [module for module in check_module("unpatch_transformers: model", model).modules() if _family(module)]
    else:
        routers = [router for cls in _stock_forwards for router in routers_with_instance_state(cls)]
    for router in routers:
        strip_instance_state(router, "forward")
    if model is None:
        restore_classes(_stock_forwards, "forward")
