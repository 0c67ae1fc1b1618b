"""experiments/table12: flag checks of run.py and search.py, and run.py assembling the table from the committed
per-rank-count points (``--reuse``: no torchrun), its files written whole."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.experiments._scripts import argparse_exit, load_script

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "table12" / "results"


@pytest.mark.parametrize("argv, flag", [(["--ranks", "1", "0"], "--ranks"), (["--budget-mib", "0"], "--budget-mib"),
                                        (["--budget-mib", "nan"], "--budget-mib"), (["--grain", "0"], "--grain"),
                                        (["--grain", "-8"], "--grain")])
def test_run_rejects_nonsense_flags(argv, flag, capsys, tmp_path):
    """Argparse error naming the flag, exit 2, before any torchrun is launched or anything written."""
    run = load_script("experiments/table12/run.py")
    assert flag in argparse_exit(run.main, [*argv, "--out-dir", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, flag", [(["--budget-mib", "0"], "--budget-mib"),
                                        (["--budget-mib", "-32"], "--budget-mib"),
                                        (["--budget-mib", "inf"], "--budget-mib"), (["--grain", "0"], "--grain")])
def test_search_rejects_nonsense_flags(argv, flag, capsys, tmp_path):
    """``--budget-mib 0`` is an error, no longer silently the default budget (``or``); nothing written."""
    search = load_script("experiments/table12/search.py")
    out = tmp_path / "point.json"
    assert flag in argparse_exit(search.main, [*argv, "--out", str(out)], capsys)
    assert not out.exists()


def test_run_reuse_writes_the_table_from_points(tmp_path):
    """--reuse reads results/points/ (the SLURM path): JSON, markdown and PNG written, the measured rows those of
    the committed table (the planner column may move with the planner), no temporary file left."""
    shutil.copytree(RESULTS / "points", tmp_path / "points")
    subprocess.run([sys.executable, str(ROOT / "experiments/table12/run.py"), "--reuse", "--out-dir", str(tmp_path)],
                   check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["points", "table12_cpu.json", "table12_cpu.md",
                                                        "table12_cpu.png"]
    new, committed = (json.loads(p.read_text())["measured"] for p in (tmp_path / "table12_cpu.json",
                                                                       RESULTS / "table12_cpu.json"))

    def measured(rows):
        return [{k: v for k, v in r.items() if k != "planner"} for r in rows]

    assert measured(new.pop("rows")) == measured(committed.pop("rows"))
    assert new == committed
    assert (tmp_path / "table12_cpu.md").read_text().startswith(
        (RESULTS / "table12_cpu.md").read_text().splitlines()[0])
