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


def test_explain_writes_the_peak_tensors_of_each_variant(tmp_path):
    """experiments.planner.explain at a short length: one table per variant, the norms' fp32 upcasts gone with
    norms=True."""
    from experiments.planner import explain

    explain.main(["--seq-len", "32768", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "explain.json").read_text())
    assert list(results["variants"]) == list(explain.VARIANTS)
    fp32 = {name: sum(t["bytes"] for t in row["peak_tensors"] if t["dtype"] == "float32" and t["shape"][-2:] == [32768, 4096])
            for name, row in results["variants"].items()}
    assert fp32["mst"] > 0 and fp32["mst + norms"] == 0
    assert (tmp_path / "explain.md").read_text().count("| KB/token | op | dtype | shape |") == 3
