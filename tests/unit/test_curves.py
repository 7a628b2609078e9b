"""The one curve record: routing metrics become named series against the step."""

from olmoe_gatepro.evaluation.curves import layer_series, routing_curves, series_layers


def test_routing_records_become_one_series_per_layer_and_metric():
    records = [{"step": step, "gatepro_active": True,
                "layers": [{"zero_token_count": step, "partner_coactivation": 0.5 / step, "partners": [1, 0]},
                           {"zero_token_count": 2 * step, "partner_coactivation": 0.25, "partners": [1, 0]}]}
               for step in (2, 4)]
    curves = routing_curves("gatepro", records, colour="lambda", dashed=True)
    assert (curves.label, curves.colour, curves.dashed) == ("gatepro", "lambda", True)
    assert set(curves.series) == {layer_series(metric, layer) for metric in ("zero_token_count", "partner_coactivation")
                                  for layer in (0, 1)}  # lists such as partners are no curve
    assert curves.series[layer_series("zero_token_count", 1)] == [(2, 4), (4, 8)]
    assert curves.series[layer_series("partner_coactivation", 0)] == [(2, 0.25), (4, 0.125)]
    assert series_layers(curves, "zero_token_count") == [0, 1] and series_layers(curves, "flip_rate") == []
