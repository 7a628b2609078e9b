"""The package as users install it: the built wheel in a clean target, and the core without its extras."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout, installed (without dependencies) into an empty folder."""
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(folder / "dist"), str(ROOT)], check=True, cwd=folder)
    wheels = sorted((folder / "dist").glob("olmoe_gatepro-*.whl"))
    assert len(wheels) == 1, wheels
    target = folder / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheels[0])],
                   check=True, cwd=folder)
    return wheels[0], target


def _run(target: Path, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """``olmoe-gatepro ARGV`` from the installed copy (not the checkout: run outside it, the target first)."""
    env = {**os.environ, "PYTHONPATH": str(target)}
    return subprocess.run([sys.executable, "-m", "olmoe_gatepro.cli", *argv], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_the_wheel_carries_the_configs_and_the_start_up_hook(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "olmoe_gatepro_env.pth" in names
    for config in ("olmoe-1b-7b/baseline.yaml", "olmoe-1b-7b/gatepro.yaml", "olmoe-1b-7b/table3/gatepro-500b.yaml",
                   "tiny-cpu/gatepro.yaml", "tiny-test.yaml", "small-1gpu.yaml"):
        assert f"olmoe_gatepro/configs/{config}" in names
    assert not [name for name in names if name.startswith("tests/")]


def test_the_installed_package_is_the_one_run(installed, tmp_path):
    _, target = installed
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import olmoe_gatepro; print(olmoe_gatepro.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, check=True).stdout.strip()
    assert Path(where).is_relative_to(target)


def test_the_installed_wheel_runs_every_preset_and_lists_its_configs(installed, tmp_path):
    _, target = installed
    for preset in ("olmoe-1b-7b-400b", "olmo-core-tiny"):
        done = _run(target, "reproduce", "--preset", preset, "--dry-run", "--out", str(tmp_path / preset), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert str(target / "olmoe_gatepro" / "configs") in done.stdout  # the trainings read the shipped configs
    listed = _run(target, "config", "list", cwd=tmp_path)
    assert listed.returncode == 0 and "olmoe-1b-7b/gatepro" in listed.stdout.split()
    shown = _run(target, "config", "show", "olmoe-1b-7b/gatepro", cwd=tmp_path)
    assert shown.stdout == (ROOT / "olmoe_gatepro/configs/olmoe-1b-7b/gatepro.yaml").read_text()
    copied = _run(target, "config", "show", "olmoe-1b-7b/table3/gatepro-100b-then-off", "--copy-to", "mine", cwd=tmp_path)
    assert copied.returncode == 0, copied.stderr
    assert sorted(str(path.relative_to(tmp_path / "mine")) for path in (tmp_path / "mine").rglob("*.yaml")) == [
        "olmoe-1b-7b/baseline.yaml", "olmoe-1b-7b/gatepro.yaml", "olmoe-1b-7b/table3/gatepro-100b-then-off.yaml"]
    by_copy = _run(target, "train", "mine/olmoe-1b-7b/table3/gatepro-100b-then-off.yaml", "--dry-run", cwd=tmp_path)
    by_name = _run(target, "train", "olmoe-1b-7b/table3/gatepro-100b-then-off", "--dry-run", cwd=tmp_path)
    assert by_copy.returncode == 0 == by_name.returncode, by_copy.stderr + by_name.stderr
    resolved = json.loads(by_name.stdout)
    assert resolved == json.loads(by_copy.stdout) and resolved["gatepro"]["off_after_tokens"] == 100_000_000_000
    again = _run(target, "config", "show", "olmoe-1b-7b/gatepro", "--copy-to", "mine", cwd=tmp_path)
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr
    unknown = _run(target, "config", "show", "olmoe-1b-7b/gatepr", cwd=tmp_path)
    assert unknown.returncode == 2 and "did you mean olmoe-1b-7b/gatepro?" in unknown.stderr


BLOCKER = """
import sys
BLOCKED = {blocked!r}
for name in BLOCKED:
    sys.modules[name] = None  # as if not installed: import raises ModuleNotFoundError, find_spec gives None
"""
EXTRAS_MODULES = ("olmo_core", "lm_eval", "datasets", "matplotlib", "scipy", "accelerate", "olmo_eval", "triton",
                  "torchmetrics")
CORE_USE = """
import torch
from transformers import OlmoeConfig, OlmoeForCausalLM
import olmoe_gatepro
from olmoe_gatepro import GateProConfig, patch_transformers, unpatch_transformers

torch.manual_seed(0)
model = OlmoeForCausalLM(OlmoeConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=2, num_experts=8,
                                     num_experts_per_tok=2, pad_token_id=None, bos_token_id=None, eos_token_id=None)).eval()
tokens = torch.randint(0, 64, (2, 16))
with torch.no_grad():
    stock = model(tokens).logits
    patch_transformers(model, GateProConfig(penalty=10.0))
    penalised = model(tokens).logits
    unpatch_transformers()
    restored = model(tokens).logits
assert not torch.equal(stock, penalised), "GatePro changed nothing"
assert torch.equal(stock, restored), "unpatching did not restore stock routing"
loaded = sorted(name for name in BLOCKED if sys.modules.get(name) is not None)
assert not loaded, loaded
print("core ok")
"""


def test_the_core_works_without_any_extra(tmp_path):
    code = BLOCKER.format(blocked=set(EXTRAS_MODULES)) + CORE_USE
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0 and "core ok" in done.stdout, done.stderr


@pytest.mark.parametrize("blocked, argv, install", [
    ("olmo_core", ["train", "tiny-test", "--train.save_folder=run", "--data.paths=[tokens.npy]"],
     "pip install 'olmoe-gatepro[olmo-core]'"),
    ("lm_eval", ["eval", "MODEL", "--label", "x", "--out", "out", "--device", "cpu"], "pip install 'olmoe-gatepro[eval]'"),
    ("accelerate", ["smoke", "--steps", "1", "--out", "smoke"], "pip install 'olmoe-gatepro[train]'"),
])
def test_a_missing_extra_is_one_line_naming_what_to_install(tmp_path, blocked, argv, install):
    model = tmp_path / "MODEL"
    if "MODEL" in argv:
        subprocess.run([sys.executable, "-c", CORE_USE.split("torch.manual_seed(0)")[0] + f"""
torch.manual_seed(0)
OlmoeForCausalLM(OlmoeConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2)).save_pretrained({str(model)!r})
"""], check=True, capture_output=True)
    (tmp_path / "tokens.npy").write_bytes(bytes(64))  # the data check passes: the run gets as far as OLMo-core
    argv = [str(model) if item == "MODEL" else item for item in argv]
    code = BLOCKER.format(blocked={blocked}) + "from olmoe_gatepro.cli import main\nsys.exit(main(sys.argv[1:]))"
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert install in lines[-1] and len([line for line in lines if "error:" in line]) == 1, done.stderr
