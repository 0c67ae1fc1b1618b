"""Import an experiment script in-process (to call its parser or one function) without leaving anything behind.

The scripts put their own folder and experiments/ on ``sys.path`` and import top-level helpers with shared names
(``plot``, ``common``, ``run``, ...): each is loaded fresh for the script, then ``sys.path`` and ``sys.modules``
are put back as they were, so one experiment's ``plot`` never shadows another's in a later test.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
SHARED_NAMES = ("plot", "common", "max_length", "run", "search", "step", "op_width", "ablation", "compare")


def load_script(relative: str) -> ModuleType:
    """The module of ``ROOT / relative`` (e.g. "experiments/table12/search.py"), its ``__main__`` block not run."""
    path = ROOT / relative
    saved_modules = {name: sys.modules.pop(name) for name in SHARED_NAMES if name in sys.modules}
    saved_path = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location(f"_script_{path.parent.name}_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its own, unshared name: dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved_path
        for name in SHARED_NAMES:
            sys.modules.pop(name, None)
        sys.modules.update(saved_modules)
    return module


def argparse_exit(main, argv: list[str], capsys) -> str:
    """Call ``main(argv)`` (a script's entry point or parser), expect argparse's exit 2, return its stderr."""
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2, exc.value.code
    return capsys.readouterr().err
