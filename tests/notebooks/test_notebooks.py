"""Every figure notebook executes headless in under 2 minutes and writes at least one PNG into paper_figures/."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_writes_a_figure(path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    figures = ROOT / "paper_figures"
    before = {p: p.stat().st_mtime for p in figures.glob("*.png")}
    start = time.time()
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    assert time.time() - start < 120, f"{path.name} took {time.time() - start:.0f}s (limit 120s)"
    written = [p for p in figures.glob("*.png") if before.get(p) != p.stat().st_mtime]
    assert written, f"{path.name} wrote no PNG into paper_figures/"
