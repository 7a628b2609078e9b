"""GateProCallback against a stand-in trainer: real OLMo-core routers, the Trainer's call order.

OLMo-core's Trainer cannot run an MoE model on the CPU (its expert MLPs need GPU kernels), so
the stand-in reproduces what the callback relies on: ``global_step`` and
``global_train_tokens_seen`` are advanced *before* ``pre_step`` (as in ``Trainer._fit_epoch``),
then the routers run, then ``post_train_batch`` and ``post_step``.
"""

import json
from types import SimpleNamespace

import pytest
import torch
from olmo_core.nn.moe.router import MoELinearRouter

from olmoe_gatepro import unpatch
from olmoe_gatepro.core import metrics
from olmoe_gatepro.olmo_core.run_config import GateProRunConfig
from olmoe_gatepro.jsonl import read_records as read_metrics_file
from olmoe_gatepro.olmo_core.callback import GateProCallback
from olmoe_gatepro.core.reference import (reference_flip_rate, reference_gatepro, reference_load, reference_margin_fraction,
                                           reference_partner_coactivation)

D_MODEL, EXPERTS, TOP_K, PENALTY = 16, 8, 2, 0.3
TOKENS_PER_STEP = 60  # 3 x 20 tokens


@pytest.fixture(autouse=True)
def always_unpatch():
    unpatch()
    yield
    unpatch()


class StandInTrainer:
    def __init__(self, save_folder, step=0):
        torch.manual_seed(0)
        routers = torch.nn.ModuleList(
            MoELinearRouter(d_model=D_MODEL, num_experts=EXPERTS, top_k=TOP_K) for _ in range(2)
        )
        with torch.no_grad():
            for router in routers:
                router.weight.normal_(0, 0.5)
        self.train_module = SimpleNamespace(model=routers.eval())
        self.save_folder = str(save_folder)
        self.global_step = step
        self.global_train_tokens_seen = step * TOKENS_PER_STEP
        self.data_loader = SimpleNamespace(global_num_tokens_in_batch=lambda batch: TOKENS_PER_STEP)
        self.recorded = {}

    def record_metric(self, name, value, reduce_type=None, namespace=None):
        self.recorded[(self.global_step, f"{namespace}/{name}")] = value

    def fit(self, callback, until_step):
        callback.trainer = self
        callback.pre_train()
        seen = []
        while self.global_step < until_step:
            self.global_step += 1
            self.global_train_tokens_seen += TOKENS_PER_STEP
            x = torch.randn(3, 20, D_MODEL, generator=torch.Generator().manual_seed(self.global_step))
            callback.pre_step({"input_ids": None})
            with torch.no_grad():
                indices = [router(x)[1] for router in self.train_module.model]
            seen.append((self.global_step, x, indices, self.train_module.model[0]._gatepro.enabled))
            callback.post_train_batch()
            callback.post_step()
        return seen


def _callback(**schedule):
    gatepro = GateProRunConfig(enabled=True, penalty=PENALTY, **schedule)
    return GateProCallback(gatepro=gatepro, metrics_interval_steps=2)


def test_schedule_switches_at_token_boundaries_and_routes_accordingly(tmp_path):
    trainer = StandInTrainer(tmp_path)
    seen = trainer.fit(_callback(on_from_tokens=2 * TOKENS_PER_STEP, off_after_tokens=5 * TOKENS_PER_STEP), 7)
    # Step s starts after (s - 1) * TOKENS_PER_STEP tokens: on for steps 3, 4, 5.
    assert [active for _, _, _, active in seen] == [False, False, True, True, True, False, False]
    for step, x, indices, active in seen:
        for router, chosen in zip(trainer.train_module.model, indices):
            weight = router.weight.detach().view(EXPERTS, D_MODEL)
            logits = torch.nn.functional.linear(x, weight)
            expected = reference_gatepro(logits, weight, PENALTY) if active else logits
            assert torch.equal(chosen, expected.topk(TOP_K, -1).indices), f"step {step}"


def test_metrics_match_an_independent_computation(tmp_path):
    trainer = StandInTrainer(tmp_path)
    seen = trainer.fit(_callback(on_from_tokens=2 * TOKENS_PER_STEP), 4)
    lines = read_metrics_file(tmp_path / "gatepro_metrics.jsonl")
    assert [line["step"] for line in lines] == [2, 4]
    assert [line["gatepro_active"] for line in lines] == [False, True]
    for line in lines:
        _, x, indices, _ = seen[line["step"] - 1]
        for layer, router in enumerate(trainer.train_module.model):
            weight = router.weight.detach().view(EXPERTS, D_MODEL)
            logits = torch.nn.functional.linear(x, weight)
            got = line["layers"][layer]
            zero, imbalance = reference_load(indices[layer], EXPERTS)
            assert got["zero_token_count"] == zero and got["load_imbalance"] == pytest.approx(imbalance)
            assert got["flip_rate"] == pytest.approx(reference_flip_rate(logits, weight, TOP_K, PENALTY))
            assert got["avg_cosine_similarity"] == pytest.approx(metrics.average_cosine_similarity(weight))
            assert got["partner_coactivation"] == pytest.approx(reference_partner_coactivation(indices[layer], weight))
            assert got["partner_coactivation_chance"] == pytest.approx((TOP_K - 1) / (EXPERTS - 1))
            assert got["margin_below_penalty"] == pytest.approx(reference_margin_fraction(logits, TOP_K, PENALTY))
            assert trainer.recorded[(line["step"], f"gatepro/layer {layer:02d}/flip_rate")] == got["flip_rate"]
    assert any(layer["flip_rate"] > 0 for line in lines for layer in line["layers"])
    assert any(layer["partner_coactivation"] > 0 for line in lines for layer in line["layers"])


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    schedule = dict(on_from_tokens=3 * TOKENS_PER_STEP, off_after_tokens=6 * TOKENS_PER_STEP)
    straight = StandInTrainer(tmp_path / "straight").fit(_callback(**schedule), 8)

    first = StandInTrainer(tmp_path / "resumed")
    first.fit(_callback(**schedule), 6)  # metrics lines for steps 2, 4, 6; checkpoint at 4
    path = tmp_path / "resumed" / "gatepro_metrics.jsonl"
    with open(path, "a") as file:
        file.write('{"step": 7, "cut sho')  # the crash cut a line short
    resumed = StandInTrainer(tmp_path / "resumed", step=4).fit(_callback(**schedule), 8)

    assert [s[3] for s in resumed] == [s[3] for s in straight[4:]]
    for (_, _, got, _), (_, _, expected, _) in zip(resumed, straight[4:]):
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    straight_lines = read_metrics_file(tmp_path / "straight" / "gatepro_metrics.jsonl")
    assert read_metrics_file(path) == straight_lines
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 4
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_disabled_gatepro_still_records_what_it_would_flip(tmp_path):
    trainer = StandInTrainer(tmp_path)
    callback = GateProCallback(gatepro=GateProRunConfig(enabled=False, penalty=PENALTY), metrics_interval_steps=1)
    seen = trainer.fit(callback, 2)
    assert not any(active for *_, active in seen)
    line = read_metrics_file(tmp_path / "gatepro_metrics.jsonl")[0]
    assert line["gatepro_active"] is False and line["layers"][0]["flip_rate"] > 0
