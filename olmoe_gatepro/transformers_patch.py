"""GatePro for transformers' OLMoE (``OlmoeTopKRouter``), patched at run time.

``patch_transformers()`` replaces ``OlmoeTopKRouter.forward`` so every OLMoE router, of models
already built and built later, routes with GatePro; ``patch_transformers(model=m)`` patches only
the routers of ``m``. ``unpatch_transformers()`` restores the stock forward everywhere.

The patched router returns, like the stock one, ``(router_logits, top_k_weights, top_k_index)``:
``router_logits`` are the penalised float32 logits, so what transformers records for the
load-balancing loss and ``output_router_logits`` agrees with the experts chosen; the weights
are softmax over all N penalised logits, then top-k (renormalised only where the config says
``norm_topk_prob``), in the hidden states' dtype as stock. With GatePro disabled the stock
forward runs unchanged. Settings live in a plain attribute, the optional cached partner table
in another: neither is a parameter or buffer, so the state dict keeps exactly its stock keys.
"""

import contextlib
import types
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from olmoe_gatepro.config import GateProConfig
from olmoe_gatepro.gatepro import competition_partners, gatepro_logits

__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "patch_transformers",
    "unpatch_transformers",
    "set_gatepro",
    "gatepro_settings",
    "refresh_partners",
    "olmoe_routers",
]

SUPPORTED_TRANSFORMERS = (">=5.23", "<6")
_SETTINGS = "_gatepro"
_PARTNERS = "_gatepro_partners"
_stock_forward = None
_instance_patched: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _router_class() -> type:
    """transformers' ``OlmoeTopKRouter``, after checking the installed version is supported."""
    import transformers
    from packaging.specifiers import SpecifierSet

    supported = SpecifierSet(",".join(SUPPORTED_TRANSFORMERS))
    if transformers.__version__ not in supported:
        raise RuntimeError(
            f"olmoe-gatepro's transformers patch supports transformers {supported}; "
            f"installed is {transformers.__version__}"
        )
    from transformers.models.olmoe import modeling_olmoe

    return modeling_olmoe.OlmoeTopKRouter


def _gatepro_router_forward(self, hidden_states: torch.Tensor):
    settings: GateProConfig = getattr(self, _SETTINGS)
    if not settings.enabled:
        return _stock_forward(self, hidden_states)
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    raw_logits = F.linear(hidden_states, self.weight)
    partners = None
    if settings.partner_refresh_steps is not None:
        partners = getattr(self, _PARTNERS, None)
        if partners is None:
            raise RuntimeError(
                "GatePro partner_refresh_steps is set but this router has no partner table yet: "
                "call olmoe_gatepro.refresh_partners(model) before the first forward"
            )
    router_logits = gatepro_logits(
        raw_logits,
        self.weight,
        settings.penalty,
        partners=partners,
        num_competitors=settings.num_competitors,
        hard=settings.hard,
    )
    router_probs = F.softmax(router_logits, dim=-1)
    top_k_weights, top_k_index = torch.topk(router_probs, self.top_k, dim=-1)
    if self.norm_topk_prob:
        top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
    return router_logits, top_k_weights.to(raw_logits.dtype), top_k_index


def olmoe_routers(model: nn.Module) -> list[nn.Module]:
    """The ``OlmoeTopKRouter`` modules of ``model``, in module order."""
    router_class = _router_class()
    return [module for module in model.modules() if isinstance(module, router_class)]


def _config_from(config: GateProConfig | None, settings: dict) -> GateProConfig:
    return (config or GateProConfig()).replace(**settings)


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
    gatepro = _config_from(config, settings)
    if _stock_forward is None:
        _stock_forward = router_class.forward
    if model is None:
        router_class.forward = _gatepro_router_forward
        setattr(router_class, _SETTINGS, gatepro)
        return
    routers = olmoe_routers(model)
    if not routers:
        raise ValueError(f"{type(model).__name__} has no OlmoeTopKRouter to patch")
    for router in routers:
        router.forward = types.MethodType(_gatepro_router_forward, router)
        setattr(router, _SETTINGS, gatepro)
        _instance_patched.add(router)
    if gatepro.partner_refresh_steps is not None:
        refresh_partners(model)


def unpatch_transformers(model: nn.Module | None = None) -> None:
    """Restore stock routing.

    With ``model``: remove what ``patch_transformers(model=model)`` and ``set_gatepro`` set on
    its routers (a class-wide patch, if any, still applies to it). With None: restore the
    class's stock forward and strip every instance patch, so all models route as stock.
    """
    global _stock_forward
    routers = olmoe_routers(model) if model is not None else list(_instance_patched)
    for router in routers:
        for name in ("forward", _SETTINGS, _PARTNERS):
            router.__dict__.pop(name, None)
        _instance_patched.discard(router)
    if model is None and _stock_forward is not None:
        router_class = _router_class()
        router_class.forward = _stock_forward
        if _SETTINGS in router_class.__dict__:
            delattr(router_class, _SETTINGS)
        _stock_forward = None


def _patched_routers(model: nn.Module) -> list[nn.Module]:
    routers = olmoe_routers(model)
    unpatched = [router for router in routers if not hasattr(router, _SETTINGS)]
    if not routers or unpatched:
        raise RuntimeError(
            f"{type(model).__name__} is not routed by GatePro: call "
            "olmoe_gatepro.patch_transformers() (or patch_transformers(model=...)) first"
        )
    return routers


def set_gatepro(model: nn.Module, **changes) -> None:
    """Change GatePro settings of a live model, e.g. ``set_gatepro(model, enabled=False)``.

    Parameters, buffers and optimizer state are untouched: GatePro is hot-swappable.
    """
    routers = _patched_routers(model)
    for router in routers:
        setattr(router, _SETTINGS, getattr(router, _SETTINGS).replace(**changes))
        _instance_patched.add(router)
    if any(getattr(router, _SETTINGS).partner_refresh_steps is not None for router in routers):
        refresh_partners(model)


@contextlib.contextmanager
def gatepro_settings(model: nn.Module, **changes) -> Iterator[None]:
    """Apply ``set_gatepro(model, **changes)`` inside the block, and restore the settings after."""
    routers = _patched_routers(model)
    saved = [router.__dict__.get(_SETTINGS) for router in routers]
    set_gatepro(model, **changes)
    try:
        yield
    finally:
        for router, previous in zip(routers, saved):
            if previous is None:
                router.__dict__.pop(_SETTINGS, None)
            else:
                setattr(router, _SETTINGS, previous)


@torch.no_grad()
def refresh_partners(model: nn.Module, step: int | None = None) -> bool:
    """Recompute the cached partner tables of ``model``'s routers that cache them.

    Call once per optimizer step with the step number; a router with
    ``partner_refresh_steps = k`` recomputes at steps divisible by k (always when ``step`` is
    None). Returns whether any table was recomputed.
    """
    refreshed = False
    for router in _patched_routers(model):
        settings: GateProConfig = getattr(router, _SETTINGS)
        interval = settings.partner_refresh_steps
        if interval is None or (step is not None and step % interval != 0):
            continue
        partners = competition_partners(router.weight, settings.num_competitors)
        cached = router.__dict__.get(_PARTNERS)
        if cached is not None and cached.shape == partners.shape and cached.device == partners.device:
            cached.copy_(partners)
        else:
            router.__dict__[_PARTNERS] = partners
        refreshed = True
    return refreshed
