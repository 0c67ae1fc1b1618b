"""experiments.planner.compare: flag checks, and ``--replot`` rewriting summary and figures whole."""
from __future__ import annotations

import json
import shutil

import pytest

from experiments.planner import compare
from tests.utils import argparse_exit


@pytest.mark.parametrize("argv, flag", [(["--layers", "0"], "--layers"), (["--layers", "1.5"], "--layers"),
                                        (["--gpu-mem-gb", "0"], "--gpu-mem-gb"),
                                        (["--gpu-mem-gb", "nan"], "--gpu-mem-gb"),
                                        (["--gpu-mem-gb", "-inf"], "--gpu-mem-gb")])
def test_compare_rejects_nonsense_flags(argv, flag, capsys, tmp_path):
    """Argparse error naming the flag, exit 2, nothing measured or written."""
    assert flag in argparse_exit(compare.main, [*argv, "--out", str(tmp_path / "results")], capsys)
    assert not (tmp_path / "results").exists()


def test_replot_rewrites_summary_and_figures(tmp_path):
    """--replot from the committed JSON: summary.md and both PNGs, each replaced whole (no temporary file left,
    an old file overwritten), the summary exactly ``summary`` of the JSON."""
    for name in ("compare.json", "limits.json"):
        shutil.copy(compare.RESULTS / name, tmp_path / name)
    (tmp_path / "summary.md").write_text("old")
    compare.main(["--replot", "--out", str(tmp_path), "--figures", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.json", "limits.json", "planner_errors.png",
                                                        "planner_limits.png", "summary.md"]
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    lim = json.loads((tmp_path / "limits.json").read_text())
    assert (tmp_path / "summary.md").read_text() == compare.summary(rows, lim, lim["gpu_mem_gb"])
    assert (tmp_path / "planner_errors.png").stat().st_size > 0 and (tmp_path / "planner_limits.png").stat().st_size > 0
