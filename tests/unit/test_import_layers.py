"""No arrow climbs: each module of the package imports only its own layer and those below it.

Layers, bottom up: the ground floor (records, provenance, tokenizers and token files,
checkpoint recognition) and ``core`` (the math and its router state); the integrations
(``olmo_core``, ``transformers``, and the start-up activation that patches them); ``evaluation``;
``pipelines``; the ``cli``. Every import counts, also those inside functions.
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "olmoe_gatepro"
LAYERS = {  # the first dotted part under olmoe_gatepro -> layer
    "jsonl": 0, "provenance": 0, "extras": 0, "interrupts": 0, "data": 0, "checkpoints": 0, "devices": 0, "core": 0,
    "olmo_core": 1, "transformers": 1, "env_activation": 1, "__init__": 1,
    "evaluation": 2,
    "pipelines": 3,
    "cli": 4,
}
FRAMEWORKS = ("transformers", "olmo_core", "lm_eval", "datasets", "matplotlib", "olmo_eval")


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _part(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = ["olmoe_gatepro", *path.relative_to(PACKAGE).with_suffix("").parts[:-1]]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            names = [f"{base}.{alias.name}" for alias in node.names] if base == "olmoe_gatepro" else [base]
            found += [(node.lineno, name) for name in names]
    return found


def test_every_module_has_a_layer():
    assert {_part(path) for path in _modules()} <= set(LAYERS)


@pytest.mark.parametrize("path", _modules(), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_no_import_climbs_a_layer(path):
    own = LAYERS[_part(path)]
    climbing = []
    for line, name in _imports(path):
        parts = name.split(".")
        if parts[0] != "olmoe_gatepro" or len(parts) < 2:
            continue
        if LAYERS[parts[1]] > own:
            climbing.append(f"{path.relative_to(PACKAGE)}:{line} imports {name} (layer {LAYERS[parts[1]]} > {own})")
    assert not climbing, "\n".join(climbing)


@pytest.mark.parametrize("path", sorted((PACKAGE / "core").rglob("*.py")), ids=lambda path: path.name)
def test_core_imports_no_framework_but_torch(path):
    used = [f"line {line}: {name}" for line, name in _imports(path) if name.split(".")[0] in FRAMEWORKS]
    assert not used, used


def test_the_integrations_do_not_import_each_other():
    for own, other in (("olmo_core", "transformers"), ("transformers", "olmo_core")):
        for path in (PACKAGE / own).rglob("*.py"):
            assert not [name for _, name in _imports(path) if name.startswith(f"olmoe_gatepro.{other}")], path


def test_the_walker_sees_a_climbing_import(tmp_path, monkeypatch):
    """The check can fail: a core module importing the CLI inside a function is caught."""
    fake = tmp_path / "olmoe_gatepro"
    (fake / "core").mkdir(parents=True)
    (fake / "core" / "bad.py").write_text("def f():\n    from olmoe_gatepro.cli import main\n    from ..pipelines import study\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    with pytest.raises(AssertionError, match="cli"):
        test_no_import_climbs_a_layer(fake / "core" / "bad.py")
    names = [name for _, name in _imports(fake / "core" / "bad.py")]
    assert names == ["olmoe_gatepro.cli", "olmoe_gatepro.pipelines"]
