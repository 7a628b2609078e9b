"""The cost estimate against a hand computation for OLMoE-1B-7B, and OLMo-core's own FLOP count."""

import dataclasses
import json
import math
from pathlib import Path

import pytest

from olmoe_gatepro.cli import main
from olmoe_gatepro.olmo_core import cost
from olmoe_gatepro.olmo_core.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[2]
GATEPRO = str(ROOT / "configs/olmoe-1b-7b/gatepro.yaml")
H100_DENSE_BF16 = 989.5e12  # NVIDIA's H100 SXM data sheet: 1,979 TFLOP/s bf16 with sparsity, half that dense


def _by_hand(model, seq_len: int) -> dict:
    """Parameter and FLOP counts of an OLMoE from its shapes, module by module."""
    d, h, layers = model.d_model, model.expert_hidden_size, model.n_layers
    embedding = lm_head = model.embedding_size * d
    final_norm = d
    attention = 4 * d * d + 2 * d  # q, k, v, o projections; q and k norms over the full width
    block_norms = 2 * d  # before attention and before the MoE
    router = d * model.num_experts
    expert = 3 * d * h  # SwiGLU: gate, up, down
    total = embedding + lm_head + final_norm + layers * (attention + block_norms + router + model.num_experts * expert)
    active = embedding + lm_head + final_norm + layers * (attention + block_norms + router + model.top_k * expert)
    # Forward + backward: 2 + 4 FLOPs per weight of every matmul a token goes through (not the embedding lookup, not
    # the block norms), and 12 d FLOPs per causally attended (query, key) pair, seq_len (seq_len + 1) / 2 of them.
    matmul = active - embedding - layers * block_norms
    attention_flops = 12 * d * layers * (seq_len * (seq_len + 1) // 2) / seq_len
    return {"total": total, "active": active, "flops_per_token": 6 * matmul + attention_flops}


def test_olmoe_1b_7b_by_hand():
    run = load_run_config(GATEPRO)
    hand = _by_hand(run.model, run.train.sequence_length)
    assert cost.total_params(run.model) == hand["total"] == 6_919_161_856  # "6.9B total"
    assert cost.active_params(run.model) == hand["active"] == 1_282_017_280  # "1.3B active"
    assert cost.flops_per_token(run.model, run.train.sequence_length) == hand["flops_per_token"]
    steps = math.ceil(400e9 / (1024 * 4096))  # whole steps of 1024 x 4096 tokens until 400B
    tokens = steps * 1024 * 4096
    gpu_hours = hand["flops_per_token"] * tokens / (H100_DENSE_BF16 * 0.3) / 3600
    estimate = cost.run_cost(run, 64, cost.Throughput("h100", 0.3))
    assert (estimate.steps, estimate.tokens) == (95_368, tokens)
    assert estimate.flops == pytest.approx(hand["flops_per_token"] * tokens, rel=1e-12)
    assert estimate.gpu_hours == pytest.approx(gpu_hours, rel=1e-12) and 2900 < gpu_hours < 3000
    assert estimate.wall_hours == pytest.approx(gpu_hours / 64, rel=1e-12)


def test_the_flop_count_is_olmo_cores():
    """The speed monitor's MFU uses ``num_flops_per_token`` of the built model: the same count."""
    from olmoe_gatepro.olmo_core.train import build_transformer_config

    for config, seq_len in ((GATEPRO, 4096), (GATEPRO, 1024), (str(ROOT / "configs/tiny-cpu/gatepro.yaml"), 32)):
        model = load_run_config(config).model
        built = build_transformer_config(model).build(init_device="meta")
        assert built.num_flops_per_token(seq_len) == cost.flops_per_token(model, seq_len)
        assert sum(p.numel() for p in built.parameters()) == cost.total_params(model)


def _measured_run(folder: Path, run, throughputs: list[float]) -> None:
    folder.mkdir()
    (folder / "run_config.json").write_text(json.dumps(dataclasses.asdict(run)))
    lines = [{"step": step, "train/CE loss": 3.0} for step in range(1, len(throughputs) + 1)]
    lines += [{"step": step, "throughput/device/TPS": tps} for step, tps in enumerate(throughputs, 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_a_measured_throughput_replaces_the_assumed_mfu(tmp_path):
    run = load_run_config(GATEPRO)
    _measured_run(tmp_path / "short", run, [900.0, 30_000.0, 31_000.0, 29_000.0, 30_500.0, 29_500.0])
    estimate = cost.run_cost(run, 64, cost.Throughput("h200", measured_in=str(tmp_path / "short")))
    assert estimate.tokens_per_second_per_gpu == 30_000.0  # the median after the first (warm-up) step
    assert estimate.gpu_hours == pytest.approx(estimate.tokens / 30_000 / 3600)
    assert estimate.mfu == pytest.approx(30_000 * estimate.flops_per_token / 989.5e12)
    assert "measured in" in cost.format_cost(estimate)
    other = dataclasses.replace(run, model=dataclasses.replace(run.model, n_layers=8))
    _measured_run(tmp_path / "other", other, [1.0] * 6)
    with pytest.raises(ValueError, match="another model"):
        cost.run_cost(run, 64, cost.Throughput(measured_in=str(tmp_path / "other")))
    _measured_run(tmp_path / "few", run, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="2 values"):
        cost.run_cost(run, 64, cost.Throughput(measured_in=str(tmp_path / "few")))


def test_dry_runs_print_the_cost(tmp_path, capsys):
    run = load_run_config(GATEPRO)
    hand = _by_hand(run.model, 4096)
    gpu_hours = hand["flops_per_token"] * 95_368 * 1024 * 4096 / (989.5e12 * 0.4) / 3600
    assert main(["reproduce", "--preset", "olmoe-1b-7b-400b", "--dry-run", "--out", str(tmp_path), "--nodes", "8",
                 "--gpu", "h200", "--mfu", "0.4"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# cost ")]
    assert len(lines) == 5  # two lines per arm and the total
    for arm, line in zip(("baseline", "gatepro"), lines[1::2]):
        assert line.startswith(f"# cost olmoe-1b-7b-{arm}-400b: {gpu_hours:,.0f} GPU-hours, {gpu_hours / 64:.1f} h wall "
                               "on 64 GPUs, at 40% MFU (assumed) of the h200's")
    assert lines[4] == f"# cost all 2 runs: {2 * gpu_hours:,.0f} GPU-hours, {2 * gpu_hours / 64:.1f} h wall one after " \
                       "another on 64 GPUs"
    assert main(["train", GATEPRO, "--dry-run", "--gpus", "16"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["name"] == "olmoe-1b-7b-gatepro-400b"  # stdout stays the resolved config
    assert f"{hand['flops_per_token'] * 95_368 * 1024 * 4096 / (989.5e12 * 0.25) / 3600:,.0f} GPU-hours" in err
    for args, message in ((["--mfu", "0"], "--mfu: mfu must lie in (0, 1]"), (["--gpus", "0"], "--gpus must be >= 1"),
                          (["--throughput-from", str(tmp_path / "none")], "no such folder")):
        with pytest.raises(SystemExit) as error:
            main(["train", GATEPRO, "--dry-run", *args])
        assert error.value.code == 2 and message in capsys.readouterr().err
