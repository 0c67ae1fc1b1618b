"""experiments/planner/compare.py: flag checks, and ``--replot`` rewriting summary and figures whole."""
from __future__ import annotations

import shutil

import pytest

from tests.experiments._scripts import argparse_exit, load_script


@pytest.mark.parametrize("argv, flag", [(["--layers", "0"], "--layers"), (["--layers", "1.5"], "--layers"),
                                        (["--gpu-mem-gb", "0"], "--gpu-mem-gb"),
                                        (["--gpu-mem-gb", "nan"], "--gpu-mem-gb"),
                                        (["--gpu-mem-gb", "-inf"], "--gpu-mem-gb")])
def test_compare_rejects_nonsense_flags(argv, flag, capsys, monkeypatch, tmp_path):
    """Argparse error naming the flag, exit 2, nothing measured or written."""
    compare = load_script("experiments/planner/compare.py")
    monkeypatch.setattr(compare, "RESULTS", tmp_path / "results")
    assert flag in argparse_exit(compare.main, argv, capsys)
    assert not (tmp_path / "results").exists()


def test_replot_rewrites_summary_and_figures(monkeypatch, tmp_path):
    """--replot from the committed JSON: summary.md and both PNGs, each replaced whole (no temporary file left,
    an old file overwritten), the summary exactly ``summary`` of the JSON."""
    compare = load_script("experiments/planner/compare.py")
    for name in ("compare.json", "limits.json"):
        shutil.copy(compare.RESULTS / name, tmp_path / name)
    (tmp_path / "summary.md").write_text("old")
    monkeypatch.setattr(compare, "RESULTS", tmp_path)
    compare.main(["--replot"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.json", "errors.png", "limits.json", "limits.png",
                                                        "summary.md"]
    rows = compare.json.loads((tmp_path / "compare.json").read_text())["rows"]
    lim = compare.json.loads((tmp_path / "limits.json").read_text())
    assert (tmp_path / "summary.md").read_text() == compare.summary(rows, lim, lim["gpu_mem_gb"])
    assert (tmp_path / "errors.png").stat().st_size > 0 and (tmp_path / "limits.png").stat().st_size > 0
