"""The fork diffs in patches/ apply to the installed upstream files and route as the plugin does."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from olmoe_gatepro import patch_olmo_core, patch_transformers, unpatch

PATCHES = Path(__file__).resolve().parents[2] / "patches"
PENALTY = 0.3


@pytest.fixture(autouse=True)
def always_unpatch():
    unpatch()
    yield
    unpatch()


def _apply(diff: str, upstream_module, repo_path: str, tmp_path: Path) -> Path:
    """Copy the installed upstream file to ``tmp_path/repo_path`` and ``git apply`` the diff there."""
    target = tmp_path / repo_path
    target.parent.mkdir(parents=True)
    shutil.copy(upstream_module.__file__, target)
    result = subprocess.run(
        ["git", "apply", "--verbose", str(PATCHES / diff)], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, f"{diff} no longer applies to the installed upstream file:\n{result.stderr}"
    return target


def _load_as_sibling(path: Path, package: str, name: str, monkeypatch):
    """Import ``path`` as ``package.name``, so its relative imports resolve against upstream."""
    spec = importlib.util.spec_from_file_location(f"{package}.{name}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # transformers' decorators inspect it
    spec.loader.exec_module(module)
    return module


def test_olmo_core_diff_routes_like_the_plugin(tmp_path, monkeypatch):
    import olmo_core.nn.moe.router as upstream

    path = _apply("olmo-core-3.0.0-router.diff", upstream, "src/olmo_core/nn/moe/router.py", tmp_path)
    fork = _load_as_sibling(path, "olmo_core.nn.moe", "_gatepro_fork_router", monkeypatch)
    build = dict(d_model=16, num_experts=8, lb_loss_weight=0.01, z_loss_weight=0.001)
    forked = fork.MoERouterConfig(top_k=2, gatepro_penalty=PENALTY).build(**build).train()
    stock = upstream.MoERouterConfig(top_k=2).build(**build).train()
    with torch.no_grad():
        stock.weight.normal_(0, 0.5)
        forked.weight.copy_(stock.weight)
    x = torch.randn(3, 20, 16, generator=torch.Generator().manual_seed(0))
    stock_indices = stock(x)[1]
    patch_olmo_core(penalty=PENALTY)
    plugin, via_fork = stock(x), forked(x)
    assert not torch.equal(plugin[1], stock_indices)
    for got, expected in zip(via_fork, plugin):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_transformers_diff_routes_like_the_plugin(tmp_path, monkeypatch):
    import transformers.models.olmoe.modeling_olmoe as upstream

    from olmoe_gatepro.pipelines.presets import TinyRunConfig
    from olmoe_gatepro.pipelines.tiny_run import build_tiny_olmoe

    path = _apply(
        "transformers-5.23.0-modeling_olmoe.diff", upstream, "src/transformers/models/olmoe/modeling_olmoe.py", tmp_path
    )
    fork = _load_as_sibling(path, "transformers.models.olmoe", "_gatepro_fork_modeling_olmoe", monkeypatch)
    stock = build_tiny_olmoe(TinyRunConfig(num_experts=8, top_k=2, n_layers=2, d_model=32, n_heads=2)).eval()
    config = stock.config.__class__(**{**stock.config.to_dict(), "gatepro_penalty": PENALTY})
    forked = fork.OlmoeForCausalLM(config).eval()
    forked.load_state_dict(stock.state_dict())
    input_ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stock_logits = stock(input_ids=input_ids).logits
        patch_transformers(model=stock, penalty=PENALTY)
        plugin = stock(input_ids=input_ids, output_router_logits=True)
        via_fork = forked(input_ids=input_ids, output_router_logits=True)
    assert not torch.equal(plugin.logits, stock_logits)
    torch.testing.assert_close(via_fork.logits, plugin.logits, rtol=0, atol=0)
    for got, expected in zip(via_fork.router_logits, plugin.router_logits):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
