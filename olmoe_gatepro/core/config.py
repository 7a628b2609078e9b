"""GatePro's router settings; plain Python, no framework imports."""

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["GateProConfig"]


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
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GateProConfig.{name} must be a bool; got {getattr(self, name)!r}")
        if isinstance(self.penalty, bool) or not isinstance(self.penalty, (int, float)):
            raise ValueError(f"GateProConfig.penalty must be a number; got {self.penalty!r}")
        if not math.isfinite(self.penalty) or self.penalty < 0:
            raise ValueError(f"GateProConfig.penalty must be finite and >= 0; got {self.penalty!r}")
        object.__setattr__(self, "penalty", float(self.penalty))
        if isinstance(self.num_competitors, bool) or not isinstance(self.num_competitors, int) or self.num_competitors < 1:
            raise ValueError(
                f"GateProConfig.num_competitors must be an int >= 1; got {self.num_competitors!r}"
            )
        refresh = self.partner_refresh_steps
        if refresh is not None and (isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1):
            raise ValueError(
                f"GateProConfig.partner_refresh_steps must be None or an int >= 1; got {refresh!r}"
            )

    def replace(self, **changes) -> "GateProConfig":
        """A copy with ``changes`` applied and validated; an unknown name is a ValueError."""
        known = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown GatePro setting(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)
