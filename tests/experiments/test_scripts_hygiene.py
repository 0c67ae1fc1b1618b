"""Source checks over every experiment script, so a new or edited one keeps the shared rules:

* results files are written through ``common.atomic_output`` / ``write_results`` / ``save_figure`` (a temporary
  file renamed over the old one), never by ``write_text`` / ``write_bytes`` / ``savefig`` on the final path;
* running out of memory is classified by ``mst.memory.length_search.is_allocation_failure``, not by catching
  ``torch.OutOfMemoryError`` (which misses cuBLAS / CPU-allocator failures);
* numeric flags use ``experiments.cli``'s argparse types (finite, in range), not bare ``int`` / ``float`` (seeds
  excepted);
* one package: no ``sys.path`` edits (in scripts or notebooks), and no experiment imports another experiment's
  folder (what two experiments share lives in the harness modules at the package's top level).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "experiments").rglob("*.py"))
WRITERS = {"write_text", "write_bytes"}


def _atomic_targets(with_node: ast.With) -> set[str]:
    names = set()
    for item in with_node.items:
        call = item.context_expr
        func = getattr(call, "func", None)
        if isinstance(call, ast.Call) and getattr(func, "id", getattr(func, "attr", None)) == "atomic_output" \
                and isinstance(item.optional_vars, ast.Name):
            names.add(item.optional_vars.id)
    return names


def unsafe_writes(tree: ast.AST) -> list[int]:
    """Lines of write_text / write_bytes on anything but an ``atomic_output`` temporary, and savefig to one."""
    bad = []

    def visit(node: ast.AST, atomic: frozenset) -> None:
        if isinstance(node, ast.With):
            atomic = atomic | _atomic_targets(node)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = None
            if node.func.attr in WRITERS:
                target = node.func.value
            elif node.func.attr == "savefig":
                target = node.args[0] if node.args else None
            if node.func.attr in WRITERS | {"savefig"} and not (isinstance(target, ast.Name) and target.id in atomic):
                bad.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child, atomic)

    visit(tree, frozenset())
    return bad


def oom_by_type(tree: ast.AST) -> list[int]:
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.ExceptHandler) and node.type is not None
            and "OutOfMemoryError" in ast.unparse(node.type)]


def bare_numeric_flags(tree: ast.AST) -> list[str]:
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            kind = next((k.value for k in node.keywords if k.arg == "type"), None)
            flag = next((a.value for a in node.args if isinstance(a, ast.Constant)), "?")
            if isinstance(kind, ast.Name) and kind.id in ("int", "float") and "seed" not in flag:
                bad.append(f"{flag} (line {node.lineno}: type={kind.id})")
    return bad


def path_edits(tree: ast.AST) -> list[int]:
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Attribute) and node.attr == "path"
            and isinstance(node.value, ast.Name) and node.value.id == "sys"]


def foreign_experiments(tree: ast.AST, path: Path) -> list[str]:
    """Imports of another experiment's folder (experiments.<folder>) from inside an experiment folder."""
    parts = path.relative_to(ROOT / "experiments").parts
    own = parts[0] if len(parts) > 1 else None
    folders = {p.name for p in (ROOT / "experiments").iterdir() if (p / "run.sh").exists()}
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else []
            if node.level == 2 and own:  # from ..table6 import x
                names = [f"experiments.{node.module}" if node.module else "experiments"]
                names += [f"experiments.{a.name}" for a in node.names if not node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            head = name.split(".")
            if len(head) > 1 and head[0] == "experiments" and head[1] in folders and head[1] != own:
                bad.append(f"{name} (line {node.lineno})")
    return bad


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_experiment_script_follows_the_shared_rules(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    assert not unsafe_writes(tree), f"{path}: non-atomic write at lines {unsafe_writes(tree)} (use atomic_output)"
    assert not oom_by_type(tree), f"{path}: OOM caught by type at lines {oom_by_type(tree)} (is_allocation_failure)"
    assert not bare_numeric_flags(tree), f"{path}: unchecked numeric flags {bare_numeric_flags(tree)}"
    assert not path_edits(tree), f"{path}: sys.path used at lines {path_edits(tree)} (run it as a module)"
    assert not foreign_experiments(tree, path), f"{path}: imports another experiment: {foreign_experiments(tree, path)}"


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebooks_import_the_package(path: Path) -> None:
    """Notebooks read results and draw through ``experiments``; they edit no import path and run no experiment."""
    import json

    code = "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    assert "sys.path" not in code and "subprocess" not in code, path.name


def test_the_checks_catch_what_they_are_for() -> None:
    tree = ast.parse("""
def f(out, fig, p):
    out.write_text("x")
    fig.savefig(out)
    with atomic_output(out) as tmp:
        tmp.write_text("x")
        fig.savefig(tmp)
    try:
        pass
    except torch.OutOfMemoryError:
        pass
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--reps", type=positive_int)
    sys.path.insert(0, "x")
""")
    assert unsafe_writes(tree) == [3, 4]
    assert oom_by_type(tree) == [10]
    assert bare_numeric_flags(tree) == ["--steps (line 12: type=int)", "--lr (line 13: type=float)"]
    assert path_edits(tree) == [16]
    other = ast.parse("from experiments.table6.run import use\nfrom ..lss import plot\nfrom .plot import figure\n"
                      "from ..results import load\nfrom experiments.models import build_model\n")
    assert foreign_experiments(other, ROOT / "experiments" / "table8_11" / "run.py") == [
        "experiments.table6.run (line 1)", "experiments.lss (line 2)"]
