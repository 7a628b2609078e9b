"""GatePro in a run started the way OLMo-core's own scripts start one, switched on by the environment only.

``olmo_core_style_run.py`` builds OLMo-core config objects and trains them as
``olmo_core.script_utils.train`` does (its default ``moe_reordered_norm`` block, OLMo-core's
``ConfigSaverCallback``), on the CPU. With ``OLMOE_GATEPRO=1`` and ``OLMOE_GATEPRO_METRICS`` the
log names GatePro's settings once, GatePro's metrics reach the trainer and
``gatepro_metrics.jsonl``, and ``convert`` turns the checkpoint into a FlexOlmo folder from
OLMo-core's saved config alone.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS, INTERVAL = 4, 2


def _environment(**variables) -> dict:
    env = {name: value for name, value in os.environ.items() if not name.startswith("OLMOE_GATEPRO")}
    return {**env, "OMP_NUM_THREADS": "1", **variables}


@pytest.fixture(scope="module")
def official_style_run(tmp_path_factory):
    from olmoe_gatepro.data import byte_tokenizer

    folder = tmp_path_factory.mktemp("olmo-core-own-script")
    np.random.default_rng(0).integers(2, 256, 4000).astype(np.uint16).tofile(folder / "tokens.npy")
    byte_tokenizer().backend_tokenizer.save(str(folder / "tokenizer.json"))
    command = [sys.executable, str(ROOT / "tests/olmo_core_style_run.py"), str(folder / "run"),
               str(folder / "tokens.npy"), str(folder / "tokenizer.json"), str(STEPS)]
    env = _environment(OLMOE_GATEPRO="1", OLMOE_GATEPRO_PENALTY="0.05", OLMOE_GATEPRO_METRICS=str(INTERVAL))
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return folder / "run", result.stdout + result.stderr


def test_the_log_names_gatepro_and_its_settings_once(official_style_run):
    _, log = official_style_run
    lines = [line for line in log.splitlines() if "GatePro on (OLMOE_GATEPRO, zero-code activation)" in line]
    assert len(lines) == 1, log[-3000:]
    assert "penalty=0.05 num_competitors=1 hard=False" in lines[0] and "MoELinearRouter" in lines[0]
    assert sum(f"OLMOE_GATEPRO_METRICS={INTERVAL}: GatePro's routing metrics every {INTERVAL} steps (GatePro on)" in line
               for line in log.splitlines()) == 1


def test_gatepro_metrics_reach_the_trainer_and_the_metrics_file(official_style_run):
    from olmoe_gatepro.jsonl import read_records

    run, _ = official_style_run
    records = read_records(str(run / "gatepro_metrics.jsonl"))
    assert [record["step"] for record in records] == list(range(INTERVAL, STEPS + 1, INTERVAL))
    assert all(record["gatepro_active"] and len(record["layers"]) == 2 for record in records)
    for layer in (layer for record in records for layer in record["layers"]):
        assert {"zero_token_count", "flip_rate", "avg_cosine_similarity", "spectral_entropy"} <= set(layer)
        assert layer["routed_tokens"] == 32 and 0 <= layer["zero_token_count"] <= 8
    assert any(layer["flip_rate"] > 0 for record in records for layer in record["layers"])  # lambda 0.05 flips
    logged = {}  # OLMo-core hands a step's metrics to its loggers in several calls
    for line in (run / "logged_metric_names.txt").read_text().splitlines():
        step, *names = line.split(" | ")
        logged.setdefault(int(step), set()).update(names)
    for step in range(1, STEPS + 1):
        gatepro = sorted(name for name in logged[step] if name.startswith("gatepro/"))
        assert (step % INTERVAL == 0) == ("gatepro/layer 01/flip_rate" in gatepro), (step, gatepro)


def test_convert_reads_olmo_cores_saved_config_and_writes_flex_olmo(official_style_run, tmp_path):
    from olmoe_gatepro.olmo_core.convert import convert_checkpoint

    run, _ = official_style_run
    assert not (run / "run_config.json").exists()
    record = convert_checkpoint(str(run), str(tmp_path / "hf"))
    assert (record["step"], record["architecture"]) == (STEPS, "FlexOlmoForCausalLM")
    assert record["config"] == str(run / f"step{STEPS}/config.json")
    assert record["validation"]["max_abs_logit_difference"] <= 1e-4
    assert json.loads((tmp_path / "hf/config.json").read_text())["model_type"] == "flex_olmo"


def _hook_state(tmp_path, **variables) -> subprocess.CompletedProcess:
    """What the repository's start-up hook (olmoe_gatepro_env.pth, as installed) does under ``variables``."""
    shutil.copy(ROOT / "olmoe_gatepro_env.pth", tmp_path)
    code = (f"import site; site.addsitedir({str(tmp_path)!r})\n"
            "from olmo_core.nn.moe.router import MoELinearRouter\n"
            "from olmo_core.train.trainer import Trainer\n"
            "print('ROUTERS', getattr(MoELinearRouter, '_gatepro', None), "
            "'TRAINER', hasattr(Trainer.__post_init__, '__wrapped__'))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_environment(**variables))


@pytest.mark.parametrize("switch", [None, "0"])
def test_metrics_without_gatepro_hook_the_trainer_and_leave_the_routers_stock(tmp_path, switch):
    result = _hook_state(tmp_path, OLMOE_GATEPRO_METRICS="10", **({} if switch is None else {"OLMOE_GATEPRO": switch}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ROUTERS None TRAINER True" in result.stdout
    assert "GatePro on" not in result.stderr


def test_a_bad_metrics_interval_fails_the_trainer_import_naming_the_variable(tmp_path):
    result = _hook_state(tmp_path, OLMOE_GATEPRO_METRICS="every 10")
    assert result.returncode != 0
    assert "OLMOE_GATEPRO_METRICS='every 10': expected a number of steps >= 1" in result.stderr

