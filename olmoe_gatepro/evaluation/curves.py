"""The one record every curve plot takes: a run's named series of (x, value) points.

``Curves`` holds what ``plots.py`` draws, whatever it came from: learning curves (scores and
losses against tokens trained, ``learning_curves.py``) or routing metrics over training steps
(``routing_curves``, from the per-step records of the callbacks' metrics file or of a tiny run).
No plotting library is imported here.
"""

from dataclasses import dataclass, field

__all__ = ["Curves", "routing_curves", "layer_series", "series_layers"]


@dataclass
class Curves:
    """One run's curves: ``series[name]`` is ``[(x, value), ...]`` in x order, under the legend ``label``.

    Runs sharing a ``label`` are seeds of one recipe (the routing plots average them);
    ``colour``: runs sharing it share a colour (default: the label); ``dashed``: a dashed line.
    Learning curves' x is tokens trained, with ``steps`` (tokens -> step) and GatePro's ``switches``
    (tokens at which it switched on or off); routing curves' x is the step.
    """

    label: str
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)
    switches: tuple[int, ...] = ()
    colour: str | None = None
    dashed: bool = False


def layer_series(metric: str, layer: int) -> str:
    """The series name of ``metric`` of MoE layer ``layer`` in routing curves."""
    return f"layer {layer}: {metric}"


def series_layers(curves: Curves, metric: str) -> list[int]:
    """The layers whose ``metric`` ``curves`` holds, in order."""
    prefix, suffix = "layer ", f": {metric}"
    return sorted(int(name[len(prefix):-len(suffix)]) for name in curves.series
                  if name.startswith(prefix) and name.endswith(suffix))


def routing_curves(label: str, records: list[dict], colour: str | None = None, dashed: bool = False) -> Curves:
    """Every numeric per-layer metric of ``records`` (``{"step", "layers": [{metric: value}]}`` per logged step)
    as series against the step."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for layer, metrics in enumerate(record["layers"]):
            for metric, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    series.setdefault(layer_series(metric, layer), []).append((record["step"], value))
    return Curves(label, series, colour=colour, dashed=dashed)
