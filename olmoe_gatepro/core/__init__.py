"""GatePro itself: the math, its settings, per-router state and the routing metrics (torch only)."""
