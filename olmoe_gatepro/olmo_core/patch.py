"""GatePro for OLMo-core's MoE routers, patched at run time.

OLMo-core's routers compute float32 logits in ``get_expert_logits`` and derive everything else
from them in ``forward``: the softmax scores, the top-k choice and expert weights, the tokens
per expert, the load-balancing loss (from the scores) and the router z-loss (from the logits).
The patch wraps ``get_expert_logits`` alone, so the penalised logits drive all of these and
``forward`` stays upstream's. In particular **both auxiliary losses see the penalised logits**:
they then describe the routing actually applied, and since the penalty is a detached constant
their gradients are the stock ones evaluated at the penalised point.

Patched: ``MoELinearRouter`` (what ``TransformerConfig.olmoe_1B_7B`` builds) and, where the
installed OLMo-core has it, the v2 ``MoERouterV2``. The weight may be flattened (N * d,), a
DTensor (TP-replicated or FSDP-sharded, gathered for the similarity) or a plain tensor.
"""

import types

from torch import nn

from olmoe_gatepro.core.config import GateProConfig
from olmoe_gatepro.core.router_state import (
    SETTINGS_ATTR,
    refresh_partners,
    restore_classes,
    route,
    routers_with_instance_state,
    set_instance_settings,
    strip_instance_state,
)

__all__ = ["SUPPORTED_OLMO_CORE", "patch_olmo_core", "unpatch_olmo_core", "olmo_core_router_classes"]

SUPPORTED_OLMO_CORE = ">=3.0,<3.1"
_stock_methods: dict[type, object] = {}  # router class -> its own get_expert_logits


def _check_version() -> None:
    from olmo_core.version import VERSION
    from packaging.specifiers import SpecifierSet

    if VERSION not in SpecifierSet(SUPPORTED_OLMO_CORE):
        raise RuntimeError(
            f"olmoe-gatepro's OLMo-core patch supports ai2-olmo-core {SUPPORTED_OLMO_CORE}; "
            f"installed is {VERSION}"
        )


def olmo_core_router_classes() -> list[type]:
    """The router classes to patch: ``MoELinearRouter``, and ``MoERouterV2`` where present."""
    _check_version()
    from olmo_core.nn.moe.router import MoELinearRouter

    classes = [MoELinearRouter]
    try:
        from olmo_core.nn.moe.v2.router import MoERouterV2
    except ImportError:
        return classes
    return classes + [MoERouterV2]


def _gatepro_expert_logits(stock):
    def get_expert_logits(self, x):
        return route(self, stock(self, x))

    get_expert_logits.__wrapped__ = stock
    get_expert_logits.__doc__ = "Stock expert logits (float32), then the GatePro penalty."
    return get_expert_logits


def _stock_method(router_class: type):
    if router_class not in _stock_methods:
        _stock_methods[router_class] = router_class.get_expert_logits
    return _stock_methods[router_class]


def _router_class_of(module: nn.Module, classes: list[type]) -> type | None:
    return next((cls for cls in classes if isinstance(module, cls)), None)


def patch_olmo_core(
    model: nn.Module | None = None,
    config: GateProConfig | None = None,
    *,
    router_classes: list[type] | None = None,
    **settings,
) -> None:
    """Route OLMo-core's MoE routers with GatePro.

    Args:
        model: patch only this model's routers; None patches the router classes, which covers
            every model, built before or after the call.
        config: the GatePro settings; keyword ``settings`` (``penalty=1e-3``, ...) override it.
        router_classes: patch these classes only (default ``olmo_core_router_classes()``).

    Calling it again only updates the settings.
    """
    gatepro = (config or GateProConfig()).replace(**settings)
    _check_version()
    classes = router_classes or olmo_core_router_classes()
    if model is None:
        for router_class in classes:
            stock = _stock_method(router_class)
            router_class.get_expert_logits = _gatepro_expert_logits(stock)
            setattr(router_class, SETTINGS_ATTR, gatepro)
        return
    routers = [(m, _router_class_of(m, classes)) for m in model.modules()]
    routers = [(m, cls) for m, cls in routers if cls is not None]
    if not routers:
        raise ValueError(f"{type(model).__name__} has no OLMo-core MoE router to patch")
    for router, router_class in routers:
        wrapped = _gatepro_expert_logits(_stock_method(router_class))
        router.get_expert_logits = types.MethodType(wrapped, router)
        set_instance_settings(router, gatepro)
    if gatepro.partner_refresh_steps is not None:
        refresh_partners(model)


def unpatch_olmo_core(model: nn.Module | None = None) -> None:
    """Restore stock routing: for ``model``'s routers, or (None) for the classes and every model."""
    if not _stock_methods:
        return  # nothing was ever patched; do not import OLMo-core for nothing
    classes = list(_stock_methods)
    if model is not None:
        routers = [m for m in model.modules() if _router_class_of(m, classes) is not None]
    else:
        routers = [r for cls in classes for r in routers_with_instance_state(cls)]
    for router in routers:
        strip_instance_state(router, "get_expert_logits")
    if model is None:
        restore_classes(_stock_methods, "get_expert_logits")
