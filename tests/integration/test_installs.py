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
                   "tiny-cpu/gatepro.yaml", "tiny.yaml", "small-1gpu.yaml"):
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


def _distribution_closure(requirements: list[str]) -> list:
    """The installed distributions that ``requirements`` (Requires-Dist lines) need, recursively, extras left out."""
    import importlib.metadata

    from packaging.requirements import Requirement

    found, queue = {}, list(requirements)
    while queue:
        requirement = Requirement(queue.pop())
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = requirement.name.lower().replace("_", "-")
        if name not in found:
            found[name] = importlib.metadata.distribution(name)
            queue += found[name].requires or []
    return list(found.values())


@pytest.fixture(scope="module")
def core_only(installed, tmp_path_factory):
    """A virtual environment holding the wheel and its required distributions alone (this venv's copies, linked)."""
    wheel, _ = installed
    env = tmp_path_factory.mktemp("core-only") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        requirements = [line.split(":", 1)[1].strip() for line in archive.read(metadata).decode().splitlines()
                        if line.startswith("Requires-Dist:")]
    for distribution in _distribution_closure(requirements):
        for top in {Path(str(file)).parts[0] for file in distribution.files or () if not str(file).startswith("..")}:
            source = Path(distribution.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True)
    return python


CORE_USE = """
import importlib.util
import torch
from transformers import OlmoeConfig, OlmoeForCausalLM
import olmoe_gatepro
from olmoe_gatepro import GateProConfig, patch_transformers, unpatch_transformers

missing = [name for name in EXTRAS if importlib.util.find_spec(name) is None]
assert missing == list(EXTRAS), f"installed in the core-only environment: {sorted(set(EXTRAS) - set(missing))}"
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
print("core ok", olmoe_gatepro.__file__)
"""
EXTRAS_MODULES = ("olmo_core", "lm_eval", "datasets", "matplotlib", "scipy", "accelerate", "olmo_eval", "triton",
                  "torchmetrics")


def test_the_core_works_without_any_extra(core_only, tmp_path):
    code = f"EXTRAS = {EXTRAS_MODULES!r}\n" + CORE_USE
    done = subprocess.run([core_only, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0 and "core ok" in done.stdout, done.stderr
    assert Path(done.stdout.split()[-1]).is_relative_to(core_only.parents[1])  # the wheel's copy, not the checkout


MODEL = """
import sys
from transformers import OlmoeConfig, OlmoeForCausalLM
OlmoeForCausalLM(OlmoeConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2)).save_pretrained(sys.argv[1])
"""


@pytest.mark.parametrize("argv, install", [
    (["train", "tiny", "--train.save_folder=run", "--data.paths=[tokens.npy]"], "pip install 'olmoe-gatepro[olmo-core]'"),
    (["eval", "MODEL", "--label", "x", "--out", "out", "--device", "cpu"], "pip install 'olmoe-gatepro[eval]'"),
    (["smoke", "--steps", "1", "--out", "smoke"], "pip install 'olmoe-gatepro[train]'"),
])
def test_a_missing_extra_is_one_line_naming_what_to_install(core_only, tmp_path, argv, install):
    if "MODEL" in argv:
        subprocess.run([core_only, "-c", MODEL, str(tmp_path / "MODEL")], check=True, capture_output=True)
    (tmp_path / "tokens.npy").write_bytes(bytes(64))  # the data check passes: the run gets as far as OLMo-core
    argv = [str(tmp_path / "MODEL") if item == "MODEL" else item for item in argv]
    done = subprocess.run([core_only, "-m", "olmoe_gatepro.cli", *argv], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert install in lines[-1] and len([line for line in lines if "error:" in line]) == 1, done.stderr
