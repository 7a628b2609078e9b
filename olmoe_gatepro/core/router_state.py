"""GatePro state on router modules of any framework: settings, cached partners, hot swap.

An integration marks a router as GatePro-routed by giving it (its class, or the instance) a
``GateProConfig`` under the attribute ``_gatepro``; a cached partner table, when used, lives
under ``_gatepro_partners``. Both are plain attributes, never parameters or buffers, so state
dicts keep their stock keys. A router exposes ``weight`` ((N, d) or flattened (N * d,), maybe a
DTensor) and ``num_experts``.
"""

import contextlib
import weakref
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from olmoe_gatepro.core.checks import check_bool, check_int, type_name
from olmoe_gatepro.core.config import METRICS_FILE, GateProConfig, GateProRunConfig
from olmoe_gatepro.core.gatepro import competition_partners, penalise_losers
from olmoe_gatepro.core.metrics import RoutingTally, boundary_margins, router_weight_metrics, topk_set_changed

__all__ = [
    "METRICS_FILE",
    "SETTINGS_ATTR",
    "PARTNERS_ATTR",
    "router_weight_matrix",
    "penalised_logits",
    "gatepro_routers",
    "set_gatepro",
    "gatepro_settings",
    "refresh_partners",
    "route",
    "start_recording",
    "stop_recording",
    "is_recording",
    "tally_metrics",
    "finish_recording",
    "begin_step",
    "finish_step",
    "set_instance_settings",
    "restore_classes",
    "strip_instance_state",
    "routers_with_instance_state",
    "check_module",
    "settings_to_apply",
]

SETTINGS_ATTR = "_gatepro"
PARTNERS_ATTR = "_gatepro_partners"
RECORD_ATTR = "_gatepro_record"
_with_instance_state: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def router_weight_matrix(router: nn.Module) -> torch.Tensor:
    """The router's full, detached (N, d) weight: a DTensor (FSDP/TP shard) is gathered first."""
    weight = router.weight.detach()
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    return weight.view(router.num_experts, -1)


def penalised_logits(router: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` (..., N) of ``router`` after GatePro with the router's settings, in float32."""
    settings: GateProConfig = getattr(router, SETTINGS_ATTR)
    if settings.partner_refresh_steps is None:
        partners = competition_partners(router_weight_matrix(router), settings.num_competitors)
    else:
        partners = router.__dict__.get(PARTNERS_ATTR)
        if partners is None:
            raise RuntimeError(
                "GatePro partner_refresh_steps is set but this router has no partner table yet: "
                "call olmoe_gatepro.refresh_partners(model) before the first forward"
            )
    return penalise_losers(logits, partners, settings.penalty, hard=settings.hard)


def route(router: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """The logits the router should route with: penalised (float32) when its GatePro is enabled.

    A router with a single expert has no competitor and routes unchanged. While a recording
    tally is attached (``start_recording``), also accumulates, without any host sync, tokens
    per chosen expert, how many tokens' top-k set the penalty changes, partner co-activations
    and boundary margins below lambda.
    """
    if router.num_experts < 2:
        return logits
    settings: GateProConfig = getattr(router, SETTINGS_ATTR)
    routed = penalised_logits(router, logits) if settings.enabled else logits
    record = router.__dict__.get(RECORD_ATTR)
    if record is not None:
        _record_routing(router, record, logits.detach(), routed.detach(), settings.enabled)
    return routed


def _record_routing(router, tally: RoutingTally, logits, routed, enabled) -> None:
    top_k = router.top_k
    plain = logits.topk(top_k, dim=-1).indices.reshape(-1, top_k)
    penalised = (routed if enabled else penalised_logits(router, logits)).topk(top_k, dim=-1).indices
    penalised = penalised.reshape(-1, top_k)
    tally.add(penalised if enabled else plain, competition_partners(router_weight_matrix(router)),
              boundary_margins(logits, top_k).reshape(-1), [topk_set_changed(plain, penalised)])


def start_recording(router: nn.Module) -> None:
    """Attach a zeroed ``RoutingTally`` at the router's lambda, on its device, for ``route`` to add to."""
    router.__dict__[RECORD_ATTR] = RoutingTally(router.num_experts, router.top_k, (getattr(router, SETTINGS_ATTR).penalty,),
                                                device=router.weight.device)


def is_recording(router: nn.Module) -> bool:
    """Whether a ``start_recording`` tally is attached to ``router``."""
    return RECORD_ATTR in router.__dict__


def stop_recording(router: nn.Module) -> RoutingTally | None:
    """Detach and return the tally of ``start_recording`` (None if none was attached)."""
    return router.__dict__.pop(RECORD_ATTR, None)


def tally_metrics(tally: RoutingTally) -> dict[str, float | int]:
    """Per-layer routing metrics of a ``stop_recording`` tally (summed over ranks, if any).

    ``margin_below_penalty``: fraction of tokens whose top-k boundary margin is below the
    router's lambda (only those can change their choice); ``partner_coactivation`` beside its
    uniformly random top-k level ``partner_coactivation_chance``.
    """
    rates = tally.rates()
    return {**rates["load"], "flip_rate": rates["flip_rates"][0], "partner_coactivation": rates["partner_coactivation"],
            "partner_coactivation_chance": rates["partner_coactivation_chance"],
            "margin_below_penalty": rates["margins_below"][0], "routed_tokens": rates["routed_tokens"]}


def finish_recording(router: nn.Module) -> dict[str, float | int]:
    """Stop ``router``'s recording; its tally summed over all ranks, as metrics with the gate similarity ones.

    Under torch.distributed every rank must call it for the same routers (an all-reduce).
    """
    tally = stop_recording(router)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tally.counts)
    return {**tally_metrics(tally), **router_weight_metrics(router_weight_matrix(router))}


def begin_step(model: nn.Module, *, enabled: bool, step: int, record: bool) -> None:
    """What a training loop does before optimizer step ``step`` (1-based) of ``model``.

    GatePro on or off as the schedule says (``enabled``), cached partner tables refreshed, and,
    with ``record``, a tally attached to every router for ``finish_step``.
    """
    check_bool("enabled", enabled)
    check_bool("record", record)
    routers = gatepro_routers(model)
    if getattr(routers[0], SETTINGS_ATTR).enabled != enabled:
        set_gatepro(model, enabled=enabled)
    refresh_partners(model, step)
    if record:
        for router in routers:
            start_recording(router)


def finish_step(model: nn.Module) -> dict | None:
    """After a step ``begin_step`` recorded: ``{"gatepro_active", "layers"}`` with each router's metrics.

    None when the step was not recorded. Under torch.distributed every rank must call it (an
    all-reduce per router).
    """
    routers = gatepro_routers(model)
    if not is_recording(routers[0]):
        return None
    return {"gatepro_active": getattr(routers[0], SETTINGS_ATTR).enabled,
            "layers": [finish_recording(router) for router in routers]}


def check_module(where: str, value, hint: str = "") -> nn.Module:
    """``value`` if it is a ``torch.nn.Module``; else a TypeError naming ``where`` (and ``hint``)."""
    if not isinstance(value, nn.Module):
        raise TypeError(f"{where} must be a torch.nn.Module; got {value!r} ({type_name(value)}){hint}")
    return value


def gatepro_routers(model: nn.Module) -> list[nn.Module]:
    """The GatePro-routed modules of ``model``; a RuntimeError when there are none."""
    check_module("model", model)
    routers = [module for module in model.modules() if hasattr(module, SETTINGS_ATTR)]
    if not routers:
        raise RuntimeError(
            f"{type(model).__name__} has no GatePro-routed router: call "
            "olmoe_gatepro.patch_transformers() or patch_olmo_core() first"
        )
    return routers


def set_gatepro(model: nn.Module, **changes) -> None:
    """Change GatePro settings of a live model, e.g. ``set_gatepro(model, enabled=False)``.

    Parameters, buffers and optimizer state are untouched: GatePro is hot-swappable.
    """
    routers = gatepro_routers(model)
    for router in routers:
        set_instance_settings(router, getattr(router, SETTINGS_ATTR).replace(**changes))
    if any(getattr(router, SETTINGS_ATTR).partner_refresh_steps is not None for router in routers):
        refresh_partners(model)


@contextlib.contextmanager
def gatepro_settings(model: nn.Module, **changes) -> Iterator[None]:
    """Apply ``set_gatepro(model, **changes)`` inside the block, and restore the settings after."""
    routers = gatepro_routers(model)
    saved = [router.__dict__.get(SETTINGS_ATTR) for router in routers]
    set_gatepro(model, **changes)
    try:
        yield
    finally:
        for router, previous in zip(routers, saved):
            if previous is None:
                router.__dict__.pop(SETTINGS_ATTR, None)
            else:
                setattr(router, SETTINGS_ATTR, previous)


@torch.no_grad()
def refresh_partners(model: nn.Module, step: int | None = None) -> bool:
    """Recompute the cached partner tables of ``model``'s routers that cache them.

    Call once per optimizer step with the step number; a router with
    ``partner_refresh_steps = k`` recomputes at steps divisible by k (always when ``step`` is
    None). Returns whether any table was recomputed.
    """
    if step is not None:
        check_int("step", step, minimum=0)
    refreshed = False
    for router in gatepro_routers(model):
        settings: GateProConfig = getattr(router, SETTINGS_ATTR)
        interval = settings.partner_refresh_steps
        if interval is None or (step is not None and step % interval != 0):
            continue
        partners = competition_partners(router_weight_matrix(router), settings.num_competitors)
        cached = router.__dict__.get(PARTNERS_ATTR)
        if cached is not None and cached.shape == partners.shape and cached.device == partners.device:
            cached.copy_(partners)  # in place: a compiled graph keeps reading the same tensor
        else:
            router.__dict__[PARTNERS_ATTR] = partners
        refreshed = True
    return refreshed


def settings_to_apply(caller: str, config, changes: dict) -> GateProConfig:
    """A patch function's ``config`` (a ``GateProConfig`` or None for the defaults) with ``changes`` applied."""
    if config is None:
        config = GateProConfig()
    elif not isinstance(config, GateProConfig):
        raise TypeError(f"{caller}: config must be a GateProConfig (or None); got {config!r} ({type_name(config)}); "
                        "settings can also be given as keywords, e.g. penalty=1e-3")
    if isinstance(config, GateProRunConfig):
        raise TypeError(f"{caller}: config is a GateProRunConfig, whose schedule a patch does not run: pass "
                        "config.router_config(trained) for the settings at one point of it, or train with "
                        "GateProTrainerCallback / GateProCallback, which run it")
    return config.replace(**changes)


def set_instance_settings(router: nn.Module, settings: GateProConfig) -> None:
    """Give ``router`` its own settings, overriding its class's; remembered for unpatching."""
    setattr(router, SETTINGS_ATTR, settings)
    _with_instance_state.add(router)


def routers_with_instance_state(router_class: type) -> list[nn.Module]:
    """Live routers of ``router_class`` that carry GatePro instance attributes."""
    return [router for router in _with_instance_state if isinstance(router, router_class)]


def restore_classes(stock_methods: dict, method: str) -> None:
    """Put back each patched class's stock ``method`` and drop its class-wide settings; empties ``stock_methods``."""
    for router_class, stock in stock_methods.items():
        setattr(router_class, method, stock)
        if SETTINGS_ATTR in router_class.__dict__:
            delattr(router_class, SETTINGS_ATTR)
    stock_methods.clear()


def strip_instance_state(router: nn.Module, *names: str) -> None:
    """Remove GatePro's instance attributes (and ``names``) from ``router``."""
    for name in (SETTINGS_ATTR, PARTNERS_ATTR, RECORD_ATTR, *names):
        router.__dict__.pop(name, None)
    _with_instance_state.discard(router)
