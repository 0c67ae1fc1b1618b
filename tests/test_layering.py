"""The layering stated in ``mst/__init__.py`` is the one the code has: every import (module level or inside a
function) of every module under mst/ is parsed and must go down the layers, never up or sideways."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mst

ROOT = Path(mst.__file__).parent
# subpackage -> the mst subpackages it may import (itself included)
ALLOWED = {
    "ops": {"ops"},
    "configs": {"configs"},
    "integrations": {"ops", "integrations"},
    "memory": {"ops", "integrations", "configs", "memory"},
    "distributed": {"ops", "integrations", "configs", "distributed"},
}
NO_TRANSFORMERS = {"ops"}  # pure autograd functions: usable without Hugging Face


def imported_modules(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved; ``from pkg import mod`` gives
    pkg.mod)."""
    package = ["mst", *path.parent.relative_to(ROOT).parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] if node.level else [])
            module = ".".join(filter(None, [base, node.module]))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # submodules, if they are ones
    return found


def subpackage_files() -> dict[str, list[Path]]:
    layers: dict[str, list[Path]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if len(parts) > 1:  # mst/__init__.py and __main__.py are the entry points
            layers.setdefault(parts[0], []).append(path)
    return layers


def test_every_subpackage_has_a_place_in_the_layering() -> None:
    assert set(subpackage_files()) == set(ALLOWED)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_go_down_the_layers(layer: str) -> None:
    bad = []
    for path in subpackage_files()[layer]:
        for name in sorted(imported_modules(path)):
            top, _, rest = name.partition(".")
            if top == "mst" and rest:
                target = rest.split(".")[0]
                if target in ALLOWED and target not in ALLOWED[layer]:
                    bad.append(f"{path.relative_to(ROOT.parent)} imports {name}")
            elif top == "transformers" and layer in NO_TRANSFORMERS:
                bad.append(f"{path.relative_to(ROOT.parent)} imports {name}")
            elif top == "experiments":  # the library never depends on the experiment harness
                bad.append(f"{path.relative_to(ROOT.parent)} imports {name}")
    assert not bad, "imports against the layering of mst/__init__.py:\n" + "\n".join(bad)


def test_the_parser_sees_the_imports_the_layering_rests_on() -> None:
    """Relative, nested and function-level imports are all resolved (else the rules above would pass vacuously)."""
    assert "mst.ops" in imported_modules(ROOT / "integrations" / "hf.py")
    assert "mst.integrations.offload" in imported_modules(ROOT / "integrations" / "hf.py")
    assert "mst.configs" in imported_modules(ROOT / "memory" / "planner" / "plan.py")  # inside a function
    assert "mst.distributed.lss" in imported_modules(ROOT / "distributed" / "sequence_parallel.py")  # from . import
    assert "transformers.modeling_utils" in imported_modules(ROOT / "distributed" / "routing.py")
