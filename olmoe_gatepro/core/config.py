"""GatePro's router settings and its hot-swap schedule; plain Python, no framework imports."""

import dataclasses
from dataclasses import dataclass

from olmoe_gatepro.core.checks import check_bool, check_int, check_number

__all__ = ["GateProConfig", "GateProRunConfig", "DEFAULT_PENALTIES", "METRICS_FILE", "check_run_config"]

METRICS_FILE = "gatepro_metrics.jsonl"  # the training callbacks' file of ``router_state.finish_step`` records, one a line

# The lambdas at which ``inspect`` measures boundary margins and flip rates: the paper's, then decades up to 1.
DEFAULT_PENALTIES = ("1e-4", "1e-3", "1e-2", "1e-1", "1")


@dataclass(frozen=True)
class GateProConfig:
    """How a router applies GatePro. The defaults are the paper's method.

    Attributes:
        enabled: route with GatePro; False routes exactly as the stock router.
        penalty: lambda, subtracted from a losing expert's logit (paper: 1e-4).
        num_competitors: m, each expert competes against its m most similar experts
            (paper: 1; m > 1 is the paper's open question 2).
        hard: a loser is never chosen (its logit becomes -inf); ``penalty`` is then unused.
        partner_refresh_steps: None recomputes the partner table in every forward (paper);
            k > 0 caches it and recomputes it every k optimizer steps, through
            ``refresh_partners`` called once per step by the training loop.
    """

    enabled: bool = True
    penalty: float = 1e-4
    num_competitors: int = 1
    hard: bool = False
    partner_refresh_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("enabled", "hard"):
            check_bool(f"GateProConfig.{name}", getattr(self, name))
        object.__setattr__(self, "penalty", check_number("GateProConfig.penalty", self.penalty, minimum=0))
        object.__setattr__(self, "num_competitors", check_int("GateProConfig.num_competitors", self.num_competitors, minimum=1))
        if self.partner_refresh_steps is not None:
            object.__setattr__(self, "partner_refresh_steps",
                               check_int("GateProConfig.partner_refresh_steps", self.partner_refresh_steps, minimum=1))

    def replace(self, **changes) -> "GateProConfig":
        """A copy with ``changes`` applied and validated; an unknown name is a ValueError."""
        known = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown GatePro setting(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class GateProRunConfig(GateProConfig):
    """The ``gatepro:`` block of a training config: router settings plus the hot-swap schedule.

    The schedule counts tokens (OLMo-core; the HF ``Trainer`` with
    ``include_num_input_tokens_seen``) or, when a ``*_steps`` field is set, optimizer steps.

    Attributes:
        enabled: master switch; False trains the baseline whatever the schedule says.
        on_from_tokens: GatePro is on once this many tokens have been trained on (paper: 0).
        off_after_tokens: and off again from this many tokens on; None never switches it off
            (the paper's Table 3 switches off at 100B, 200B, 300B or 400B of 500B).
        on_from_steps, off_after_steps: the same in optimizer steps (then the token fields
            must keep their defaults).
    """

    enabled: bool = False
    on_from_tokens: int = 0
    off_after_tokens: int | None = None
    on_from_steps: int | None = None
    off_after_steps: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("GateProRunConfig.on_from_tokens", self.on_from_tokens, minimum=0)
        for unit in ("tokens", "steps"):
            on, off = getattr(self, f"on_from_{unit}"), getattr(self, f"off_after_{unit}")
            if on is not None:
                check_int(f"GateProRunConfig.on_from_{unit}", on, minimum=0)
            if off is not None and check_int(f"GateProRunConfig.off_after_{unit}", off) <= (on or 0):
                raise ValueError(f"off_after_{unit} must be None or an int > on_from_{unit} ({on or 0}); got {off!r}")
        if self.schedule_unit == "steps" and (self.on_from_tokens != 0 or self.off_after_tokens is not None):
            raise ValueError("give the GatePro schedule in tokens or in steps, not both "
                             f"(on_from_tokens={self.on_from_tokens}, off_after_tokens={self.off_after_tokens}, "
                             f"on_from_steps={self.on_from_steps}, off_after_steps={self.off_after_steps})")

    @property
    def schedule_unit(self) -> str:
        """``"steps"`` when a ``*_steps`` field is set, else ``"tokens"``."""
        return "steps" if self.on_from_steps is not None or self.off_after_steps is not None else "tokens"

    def trained(self, *, tokens: int, steps: int) -> int:
        """Of the tokens and optimizer steps trained so far, the count the schedule reads (``schedule_unit``)."""
        return check_int("tokens", tokens, minimum=0) if self.schedule_unit == "tokens" else check_int("steps", steps, minimum=0)

    def active_at(self, trained: int) -> bool:
        """Whether GatePro routes the step that starts after ``trained`` tokens (or steps: ``schedule_unit``)."""
        check_int(f"trained ({self.schedule_unit})", trained, minimum=0)
        on, off = ((self.on_from_tokens, self.off_after_tokens) if self.schedule_unit == "tokens"
                   else (self.on_from_steps or 0, self.off_after_steps))
        if not self.enabled or trained < on:
            return False
        return off is None or trained < off

    def router_config(self, trained: int) -> GateProConfig:
        """The per-router settings for the step that starts after ``trained`` tokens (or steps)."""
        return GateProConfig(
            enabled=self.active_at(trained),
            penalty=self.penalty,
            num_competitors=self.num_competitors,
            hard=self.hard,
            partner_refresh_steps=self.partner_refresh_steps,
        )


def check_run_config(where: str, gatepro, trainer=None) -> GateProRunConfig:
    """``gatepro`` if it is a ``GateProRunConfig``; a TypeError naming ``where`` otherwise.

    With ``trainer`` (what the Trainer callback is attached to): also a TypeError when it has no
    ``add_callback``.
    """
    if trainer is not None and not callable(getattr(trainer, "add_callback", None)):
        raise TypeError(f"{where.rsplit(':', 1)[0]}: trainer must be a transformers.Trainer (or anything with "
                        f"add_callback); got {type(trainer).__name__}")
    if not isinstance(gatepro, GateProRunConfig):
        hint = (" (a GateProConfig holds router settings only: use GateProRunConfig(enabled=True, ...), "
                "which adds the schedule)" if isinstance(gatepro, GateProConfig) else "")
        raise TypeError(f"{where} must be a GateProRunConfig; got {gatepro!r}{hint}")
    return gatepro
