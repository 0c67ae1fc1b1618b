"""experiments/table12: flag checks of run.py and search.py, one search on one process (the shared SP step and
length search, seeded by the planner), and run.py assembling the table from the committed per-rank-count points
(``--reuse``: no torchrun), its files written whole."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils import argparse_exit

from experiments.table12 import run, search

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "table12" / "results"


@pytest.mark.parametrize("argv, flag", [(["--ranks", "1", "0"], "--ranks"), (["--budget-mib", "0"], "--budget-mib"),
                                        (["--budget-mib", "nan"], "--budget-mib"), (["--grain", "0"], "--grain"),
                                        (["--grain", "-8"], "--grain")])
def test_run_rejects_nonsense_flags(argv, flag, capsys, tmp_path):
    """Argparse error naming the flag, exit 2, before any torchrun is launched or anything written."""
    assert flag in argparse_exit(run.main, [*argv, "--out-dir", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, flag", [(["--budget-mib", "0"], "--budget-mib"),
                                        (["--budget-mib", "-32"], "--budget-mib"),
                                        (["--budget-mib", "inf"], "--budget-mib"), (["--grain", "0"], "--grain")])
def test_search_rejects_nonsense_flags(argv, flag, capsys, tmp_path):
    """``--budget-mib 0`` is an error, no longer silently the default budget (``or``); nothing written."""
    out = tmp_path / "point.json"
    assert flag in argparse_exit(search.main, [*argv, "--out", str(out)], capsys)
    assert not out.exists()


def test_search_on_one_process_is_seeded_by_the_planner(tmp_path, monkeypatch):
    """One process (no torchrun): the search starts at the planner's limit for this exact setting, keeps to the
    grid, every trial's fit is its peak against the budget, and the limit is the largest fitting trial with the
    next grid point failing; one timed step at the limit."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "point.json"
    search.main(["--strategies", "vanilla", "--out", str(out)])
    point = json.loads(out.read_text())
    assert (point["ranks"], point["backend"], point["budget_bytes"]) == (1, None, 32 * 2 ** 20)
    assert point["environment"]["device_type"] == "cpu"
    cell = point["strategies"]["vanilla"]
    planned = search.planner_limit(search.build_config("scaled"), "vanilla", ranks=1, budget_mib=32.0, grain=8,
                                   device="cpu")
    assert cell["seed"] == planned and cell["probes"][0]["seq_len"] == planned
    assert all(t["seq_len"] % 8 == 0 and t["fits"] == (t["peak_bytes"] <= point["budget_bytes"])
               for t in cell["probes"])
    best = cell["max_seq_len"]
    assert best == max(t["seq_len"] for t in cell["probes"] if t["fits"]) > 0
    assert any(t["seq_len"] == best + 8 and not t["fits"] for t in cell["probes"])
    assert cell["step_seconds_at_max"] > 0


def test_run_reuse_writes_the_table_from_points(tmp_path):
    """--reuse reads results/points/ (the SLURM path): JSON, markdown and the figure written (the figure where
    --figure says, not paper_figures/), the measured rows those of the committed table (the planner column may
    move with the planner), no temporary file left."""
    shutil.copytree(RESULTS / "points", tmp_path / "points")
    figure = tmp_path / "figure.png"
    subprocess.run([sys.executable, "-m", "experiments.table12.run", "--reuse", "--out-dir", str(tmp_path),
                    "--figure", str(figure)],
                   check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png", "points", "table12_cpu.json",
                                                        "table12_cpu.md"]
    written = json.loads((tmp_path / "table12_cpu.json").read_text())
    assert written["environment"]["device_type"] == "cpu"
    new, committed = written["measured"], json.loads((RESULTS / "table12_cpu.json").read_text())["measured"]

    def measured(rows):
        return [{k: v for k, v in r.items() if k != "planner"} for r in rows]

    assert measured(new.pop("rows")) == measured(committed.pop("rows"))
    assert new == committed
    assert (tmp_path / "table12_cpu.md").read_text().startswith(
        (RESULTS / "table12_cpu.md").read_text().splitlines()[0])
