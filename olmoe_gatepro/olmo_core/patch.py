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

Both classes can also be configured like DeepSeek-V3 (sigmoid gating, a score correction bias
or ``bias_gamma``'s auxiliary-loss-free bias, group-limited choice) or with a router bias. The
paper defines GatePro for a bias-free linear router (b_g = 0) whose top-k is taken on the logits
and weighted by a softmax (Eq. 2-3, 9); penalising a logit then removes the loser from the
choice. With a sigmoid, a per-expert selection bias or group masking in between, the choice is
no longer made on the logits GatePro compares, and what GatePro means there is not defined.
Such a router is refused with the reason, as ``patch_transformers`` refuses DeepSeek-V3's
router: at ``patch_olmo_core(model=...)``, and for a class-wide patch at its first forward.
"""

import types

from torch import nn

from olmoe_gatepro.core.config import GateProConfig
from olmoe_gatepro.core.router_state import (
    SETTINGS_ATTR,
    check_module,
    refresh_partners,
    restore_classes,
    route,
    routers_with_instance_state,
    set_instance_settings,
    settings_to_apply,
    strip_instance_state,
)

__all__ = ["SUPPORTED_OLMO_CORE", "patch_olmo_core", "unpatch_olmo_core", "olmo_core_router_classes", "refusal_reason"]

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


def refusal_reason(router: nn.Module) -> str | None:
    """Why GatePro does not apply to this OLMo-core router (see the module docstring); None when it does.

    Reads plain attributes only, so the patched forward can check it at no cost.
    """
    reasons = []
    if str(getattr(router, "gating_function", "softmax")) == "sigmoid":
        reasons.append("sigmoid gating (gating_function='sigmoid')")
    if getattr(router, "score_bias", None) is not None:
        reasons.append("a per-expert selection bias (score_correction_bias or bias_gamma)")
    if getattr(router, "n_group", None) is not None:
        reasons.append(f"group-limited choice (n_group={router.n_group}, topk_group={router.topk_group})")
    if getattr(router, "bias", None) is not None:
        reasons.append("a router bias b_g (bias=True)")
    if not reasons:
        return None
    return (f"{type(router).__name__} with {', '.join(reasons)}: GatePro (arXiv 2510.13079) is defined for a "
            "bias-free linear router choosing the top-k of its logits under a softmax, and the penalty on a "
            "logit has no defined meaning once the choice is made on other scores (DeepSeek-V3-style routing "
            "is refused, as patch_transformers refuses DeepSeek-V3's router)")


def _gatepro_expert_logits(stock):
    def get_expert_logits(self, x):
        reason = refusal_reason(self)
        if reason is not None:
            raise ValueError(f"GatePro does not apply to this router: {reason}")
        return route(self, stock(self, x))

    get_expert_logits.__wrapped__ = stock
    get_expert_logits.__doc__ = "Stock expert logits (float32), then the GatePro penalty."
    return get_expert_logits


def _stock_method(router_class: type):
    if router_class not in _stock_methods:
        _stock_methods[router_class] = router_class.get_expert_logits
    return _stock_methods[router_class]


def _check_router_classes(router_classes) -> list[type]:
    if not isinstance(router_classes, (list, tuple)) or not all(isinstance(cls, type) for cls in router_classes):
        raise TypeError(f"patch_olmo_core: router_classes must be a list of router classes; got {router_classes!r}")
    if not router_classes:
        raise ValueError("patch_olmo_core: router_classes is empty: nothing would be patched (None: the default classes)")
    lacking = [cls.__name__ for cls in router_classes if not callable(getattr(cls, "get_expert_logits", None))]
    if lacking:
        raise TypeError(f"patch_olmo_core: router_classes {lacking} have no get_expert_logits; "
                        "expected OLMo-core MoE router classes (MoELinearRouter, MoERouterV2)")
    return list(router_classes)


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
    gatepro = settings_to_apply("patch_olmo_core", config, settings)
    if model is not None:
        check_module("patch_olmo_core: model", model)
    _check_version()
    classes = olmo_core_router_classes() if router_classes is None else _check_router_classes(router_classes)
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
    names = {module: name for name, module in model.named_modules()}
    for router, _ in routers:
        reason = refusal_reason(router)
        if reason is not None:
            raise ValueError(f"patch_olmo_core: GatePro does not apply to router {names[router]!r}: {reason}")
    for router, router_class in routers:
        wrapped = _gatepro_expert_logits(_stock_method(router_class))
        router.get_expert_logits = types.MethodType(wrapped, router)
        set_instance_settings(router, gatepro)
    if gatepro.partner_refresh_steps is not None:
        refresh_partners(model)


def unpatch_olmo_core(model: nn.Module | None = None) -> None:
    """Restore stock routing: for ``model``'s routers, or (None) for the classes and every model."""
    if model is not None:
        check_module("unpatch_olmo_core: model", model)
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
