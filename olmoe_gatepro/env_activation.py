"""Zero-code activation: GatePro in unmodified scripts, switched on by environment variables.

The package installs ``olmoe_gatepro_env.pth`` into site-packages. At interpreter start, when
``OLMOE_GATEPRO`` is 1/true/on, it calls ``install_import_hooks()``, which patches each router
module right after it is first imported: OLMo-core's ``olmo_core.nn.moe.router`` and
``olmo_core.nn.moe.v2.router``, and the modeling module of each transformers family that
``transformers.families`` supports (OLMoE, Qwen2-MoE, Qwen3-MoE, FlexOlmo, Mixtral). Every process started
with that environment (all ``torchrun`` workers included) is covered.

| variable | meaning | default |
| --- | --- | --- |
| ``OLMOE_GATEPRO`` | 1/true/on/yes: route with GatePro; unset or 0/false/off/no: stock | unset |
| ``OLMOE_GATEPRO_PENALTY`` | lambda | 1e-4 |
| ``OLMOE_GATEPRO_NUM_COMPETITORS`` | m, competitors per expert | 1 |
| ``OLMOE_GATEPRO_HARD`` | 1/true: losers are never chosen | 0 |
| ``OLMOE_GATEPRO_METRICS`` | N >= 1: every OLMo-core ``Trainer`` records GatePro's routing metrics every N steps | unset |

A bad value makes the import of the router module fail with an error naming the variable,
so a typo cannot silently train the baseline. Any other ``OLMOE_GATEPRO*`` variable (a
misspelt name such as ``OLMOE_GATEPRO_PENALTI``) gets a warning naming it and the known ones.

When the routers are patched, rank 0 logs one line with the settings (through ``logging``; to
stderr while logging is not yet configured, since routers are imported before a script sets it
up). ``OLMOE_GATEPRO_METRICS`` adds ``GateProCallback`` (``olmo_core.callback``) to every OLMo-core
``Trainer`` built in the process that does not have one: the routers keep the environment's
settings (stock routing when ``OLMOE_GATEPRO`` is off, so a baseline records the same metrics),
and zero-token counts, flip rates and gate similarity go to ``trainer.record_metric`` (console,
W&B, Comet) and ``<save_folder>/gatepro_metrics.jsonl``.
"""

import difflib
import importlib.abc
import logging
import os
import sys
import warnings
from collections.abc import Callable, Mapping

from olmoe_gatepro.core.config import GateProConfig
from olmoe_gatepro.transformers.families import FAMILIES

__all__ = ["config_from_env", "metrics_interval_from_env", "warn_unknown_variables", "install_import_hooks",
           "PATCH_TARGETS", "TRAINER_MODULE", "KNOWN_VARIABLES"]

log = logging.getLogger(__name__)

SWITCH = "OLMOE_GATEPRO"
METRICS = "OLMOE_GATEPRO_METRICS"
TRAINER_MODULE = "olmo_core.train.trainer"
METRICS_CALLBACK = "gatepro"  # the name the environment's callback gets among the trainer's callbacks
_TRUE, _FALSE = ("1", "true", "on", "yes"), ("", "0", "false", "off", "no")
_SETTINGS = {  # variable: the GateProConfig field it sets, and its type
    "OLMOE_GATEPRO_PENALTY": ("penalty", float),
    "OLMOE_GATEPRO_NUM_COMPETITORS": ("num_competitors", int),
    "OLMOE_GATEPRO_HARD": ("hard", bool),
}
# Every OLMOE_GATEPRO* variable this package reads, wherever it reads it: add a new one here.
# Any other variable of that prefix is a misspelling the user is warned about.
KNOWN_VARIABLES = (SWITCH, *_SETTINGS, METRICS)
_warned: set[str] = set()  # once per process: the hook reads the environment at every router import


def _parse_bool(name: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={text!r}: expected one of {'/'.join(_TRUE)} "
                     f"or {'/'.join(value for value in _FALSE if value)} (or unset)")


def warn_unknown_variables(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Warn (once per process each) about ``OLMOE_GATEPRO*`` variables no part of the package reads.

    Returns the unknown names, sorted, whether warned now or before.
    """
    unknown = sorted(name for name in environ if name.startswith(SWITCH) and name not in KNOWN_VARIABLES)
    for name in unknown:
        if name in _warned:
            continue
        _warned.add(name)
        suffixes = {variable.removeprefix(SWITCH): variable for variable in KNOWN_VARIABLES}
        close = difflib.get_close_matches(name.removeprefix(SWITCH), suffixes, n=1, cutoff=0.75)
        hint = f"; did you mean {suffixes[close[0]]}?" if close else ""
        warnings.warn(f"environment variable {name} is not one olmoe-gatepro reads{hint} "
                      f"(known: {', '.join(KNOWN_VARIABLES)}); it is ignored", UserWarning, stacklevel=3)
    return unknown


def config_from_env(environ: Mapping[str, str] = os.environ) -> GateProConfig | None:
    """The GatePro settings the environment asks for, or None when ``OLMOE_GATEPRO`` is off.

    A bad value is a ValueError naming its variable; an unknown ``OLMOE_GATEPRO_*`` variable
    (a misspelling) gets a warning naming it and the known ones.
    """
    warn_unknown_variables(environ)
    if not _parse_bool(SWITCH, environ.get(SWITCH, "")):
        return None
    settings = {}
    for variable, (field, kind) in _SETTINGS.items():
        if variable not in environ:
            continue
        text = environ[variable]
        if kind is bool:
            value = _parse_bool(variable, text)
        else:
            try:
                value = kind(text)
            except ValueError:
                raise ValueError(f"environment variable {variable}={text!r} is not a valid {kind.__name__}") from None
        try:
            GateProConfig(**{field: value})
        except (TypeError, ValueError) as error:
            raise ValueError(f"environment variable {variable}={text!r}: "
                             f"{str(error).removeprefix('GateProConfig.')}") from None
        settings[field] = value
    try:
        return GateProConfig(**settings)
    except ValueError as error:
        names = ", ".join(f"{variable}={environ[variable]!r}" for variable in _SETTINGS if variable in environ)
        raise ValueError(f"environment variables {names}: {error}") from None


def metrics_interval_from_env(environ: Mapping[str, str] = os.environ) -> int | None:
    """``OLMOE_GATEPRO_METRICS``: record GatePro's metrics every N steps; None when unset, empty or 0."""
    text = environ.get(METRICS, "").strip()
    try:
        interval = int(text or 0)
    except ValueError:
        interval = -1
    if interval < 0:
        raise ValueError(f"environment variable {METRICS}={environ[METRICS]!r}: expected a number of steps >= 1 "
                         "(or 0 / unset: no metrics)")
    return interval or None


_announced = False  # the settings line is logged once per process


def _rank() -> int:
    """This process's rank: torch.distributed's once initialised, else torchrun's RANK (routers are imported first)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    rank = os.environ.get("RANK", "0")
    return int(rank) if rank.isdigit() else 0


def _log_on_rank_zero(message: str) -> None:
    """``message`` at INFO from rank 0; to stderr when logging has no handler yet (it would be lost)."""
    if _rank() != 0:
        return
    if log.hasHandlers():
        log.info(message)
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s\t%(name)s\t%(levelname)s\t%(message)s"))
    handler.handle(log.makeRecord(log.name, logging.INFO, __file__, 0, message, None, None))


def _announce(config: GateProConfig, patched: str) -> None:
    global _announced
    if _announced:
        return
    _announced = True
    settings = " ".join(f"{name}={getattr(config, name)}" for name in
                        ("penalty", "num_competitors", "hard", "partner_refresh_steps"))
    _log_on_rank_zero(f"GatePro on ({SWITCH}, zero-code activation): {settings}; "
                      f"routers patched as their modules are imported, first {patched}")


def _patch_olmo_core_module(module) -> None:
    from olmoe_gatepro.olmo_core.patch import patch_olmo_core

    classes = [getattr(module, name) for name in ("MoELinearRouter", "MoERouterV2") if hasattr(module, name)]
    config = config_from_env()
    patch_olmo_core(config=config, router_classes=classes)
    _announce(config, ", ".join(f"{module.__name__}.{cls.__name__}" for cls in classes))


def _patch_transformers_module(module) -> None:
    from olmoe_gatepro.transformers.patch import patch_transformers

    families = [family for family, spec in FAMILIES.items() if spec.module == module.__name__]
    config = config_from_env()
    patch_transformers(config=config, families=families)
    _announce(config, f"{module.__name__} ({', '.join(families)})")


def _add_metrics_callback(module) -> None:
    """Every ``Trainer`` of OLMo-core's ``module`` built from now on gets GatePro's metrics callback (if it has none)."""
    interval = metrics_interval_from_env()  # a bad value fails this import, naming the variable
    trainer_class = module.Trainer
    if hasattr(trainer_class.__post_init__, "__wrapped__"):
        return
    built = trainer_class.__post_init__

    def __post_init__(self) -> None:
        built(self)
        from olmoe_gatepro.core.config import GateProRunConfig
        from olmoe_gatepro.olmo_core.callback import GateProCallback

        if self.has_callback(GateProCallback):
            return
        routing = config_from_env() or GateProConfig(enabled=False)
        gatepro = GateProRunConfig(**{field: getattr(routing, field) for field in
                                      ("enabled", "penalty", "num_competitors", "hard", "partner_refresh_steps")})
        callback = GateProCallback(gatepro=gatepro, metrics_interval_steps=interval)
        self.add_callback(METRICS_CALLBACK, callback)
        _log_on_rank_zero(f"{METRICS}={callback.metrics_interval_steps}: GatePro's routing metrics every "
                          f"{callback.metrics_interval_steps} steps (GatePro {'on' if gatepro.enabled else 'off'}), "
                          f"to the trainer's metrics and {os.path.join(str(self.save_folder), callback.metrics_file)}")

    __post_init__.__wrapped__ = built
    trainer_class.__post_init__ = __post_init__


PATCH_TARGETS: dict[str, Callable] = {
    "olmo_core.nn.moe.router": _patch_olmo_core_module,
    "olmo_core.nn.moe.v2.router": _patch_olmo_core_module,
    **{spec.module: _patch_transformers_module for spec in FAMILIES.values()},
}


class _PatchAfterExec(importlib.abc.Loader):
    """Delegates to the real loader, then runs ``callback(module)``."""

    def __init__(self, loader, callback):
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._callback(module)

    def __getattr__(self, name):  # get_source, get_filename, ... for inspect and tracebacks
        return getattr(self._loader, name)


class _GateProImportHook(importlib.abc.MetaPathFinder):
    """Finds the target modules with the other finders and wraps their loaders."""

    def __init__(self, targets: dict[str, Callable]):
        self._targets = targets

    def find_spec(self, fullname, path, target=None):
        callback = self._targets.get(fullname)
        if callback is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchAfterExec(spec.loader, callback)
        return spec


def install_import_hooks(environ: Mapping[str, str] = os.environ) -> None:
    """What the environment asks for, on each target module when first imported (now, for those
    already imported): routers patched when ``OLMOE_GATEPRO`` is on, the metrics callback when
    ``OLMOE_GATEPRO_METRICS`` is set. Nothing when neither is. Idempotent."""
    if any(isinstance(finder, _GateProImportHook) for finder in sys.meta_path):
        return
    # Bad values are not refused here (at interpreter start an error would only be printed and
    # training would go on without GatePro) but when the target module is imported.
    targets = dict(PATCH_TARGETS) if environ.get(SWITCH, "").strip().lower() not in _FALSE else {}
    if environ.get(METRICS, "").strip() not in ("", "0"):
        targets[TRAINER_MODULE] = _add_metrics_callback
    if not targets:
        return
    sys.meta_path.insert(0, _GateProImportHook(targets))
    for name, callback in targets.items():
        if name in sys.modules:
            callback(sys.modules[name])
