import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from olmoe_gatepro.env_activation import config_from_env

# An "unmodified training script": it imports OLMo-core and transformers only.
SCRIPT = """
import torch
from olmo_core.nn.moe.router import MoELinearRouter
from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter
torch.manual_seed(0)
router = MoELinearRouter(d_model=16, num_experts=8, top_k=2).eval()
with torch.no_grad():
    router.weight.normal_(0, 0.5)
x = torch.randn(4, 30, 16, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    _, indices, _, _ = router(x)
settings = getattr(MoELinearRouter, "_gatepro", None), getattr(OlmoeTopKRouter, "_gatepro", None)
torch.save({"indices": indices, "x": x, "weight": router.weight.detach()}, "routing.pt")
print("SETTINGS", *(None if s is None else (s.enabled, s.penalty, s.num_competitors, s.hard) for s in settings))
"""


def _run_script(tmp_path, **env_vars):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OLMOE_GATEPRO")}
    env.update(env_vars)
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=tmp_path)


def test_pth_hook_is_installed_and_current():
    installed = Path(sysconfig.get_paths()["purelib"]) / "olmoe_gatepro_env.pth"
    assert installed.exists(), "olmoe_gatepro_env.pth is missing from site-packages: install the package (make test does)"
    assert installed.read_text() == (Path(__file__).resolve().parents[2] / "olmoe_gatepro_env.pth").read_text(), (
        f"{installed} is not the repository's olmoe_gatepro_env.pth: reinstall the package (pip install -e .)")


def test_environment_switches_gatepro_on_in_an_unmodified_script(tmp_path):
    import torch

    from olmoe_gatepro.core.reference import reference_gatepro

    result = _run_script(tmp_path, OLMOE_GATEPRO="1", OLMOE_GATEPRO_PENALTY="0.3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SETTINGS (True, 0.3, 1, False) (True, 0.3, 1, False)" in result.stdout
    # One line for the process, though two router modules (OLMo-core's, transformers' OLMoE) were patched.
    announced = [line for line in result.stderr.splitlines() if "GatePro on (OLMOE_GATEPRO" in line]
    assert len(announced) == 1 and "INFO" in announced[0]
    assert "penalty=0.3 num_competitors=1 hard=False partner_refresh_steps=None" in announced[0]
    saved = torch.load(tmp_path / "routing.pt")
    weight = saved["weight"].view(8, 16)
    penalised = reference_gatepro(torch.nn.functional.linear(saved["x"], weight), weight, 0.3)
    assert torch.equal(saved["indices"], penalised.softmax(-1).topk(2, -1).indices)
    stock = torch.nn.functional.linear(saved["x"], weight).topk(2, -1).indices
    assert not torch.equal(saved["indices"], stock)


def test_only_rank_zero_names_the_settings(tmp_path):
    result = _run_script(tmp_path, OLMOE_GATEPRO="1", RANK="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SETTINGS (True, 0.0001, 1, False)" in result.stdout and "GatePro on" not in result.stderr


@pytest.mark.parametrize("switch", [None, "0", "off"])
def test_unset_or_off_leaves_stock_routing(tmp_path, switch):
    result = _run_script(tmp_path, **({} if switch is None else {"OLMOE_GATEPRO": switch}))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SETTINGS None None" in result.stdout and "GatePro on" not in result.stderr


def test_bad_value_fails_the_import_naming_the_variable(tmp_path):
    result = _run_script(tmp_path, OLMOE_GATEPRO="1", OLMOE_GATEPRO_PENALTY="1e-4x")
    assert result.returncode != 0
    assert "OLMOE_GATEPRO_PENALTY='1e-4x'" in result.stderr


def test_metrics_interval_parsing():
    from olmoe_gatepro.env_activation import metrics_interval_from_env

    assert [metrics_interval_from_env(env) for env in ({}, {"OLMOE_GATEPRO_METRICS": "0"},
                                                       {"OLMOE_GATEPRO_METRICS": " 100 "})] == [None, None, 100]
    for bad in ("-5", "1.5", "often"):
        with pytest.raises(ValueError, match=f"OLMOE_GATEPRO_METRICS='{bad}': expected a number of steps >= 1"):
            metrics_interval_from_env({"OLMOE_GATEPRO_METRICS": bad})


def test_config_from_env_parsing():
    assert config_from_env({}) is None
    assert config_from_env({"OLMOE_GATEPRO": "off"}) is None
    config = config_from_env({"OLMOE_GATEPRO": "on", "OLMOE_GATEPRO_NUM_COMPETITORS": "2", "OLMOE_GATEPRO_HARD": "true"})
    assert (config.num_competitors, config.hard, config.penalty) == (2, True, 1e-4)
    with pytest.raises(ValueError, match="OLMOE_GATEPRO='maybe'"):
        config_from_env({"OLMOE_GATEPRO": "maybe"})
    with pytest.raises(ValueError, match="penalty must be finite and >= 0; got -1.0"):
        config_from_env({"OLMOE_GATEPRO": "1", "OLMOE_GATEPRO_PENALTY": "-1"})


def test_environment_patches_every_supported_family_on_import():
    code = ("from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter\n"
            "from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter\n"
            "print(MixtralTopKRouter._gatepro.penalty, Qwen3MoeTopKRouter._gatepro.penalty)")
    env = {**os.environ, "OLMOE_GATEPRO": "1", "OLMOE_GATEPRO_PENALTY": "0.2"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["0.2", "0.2"]
