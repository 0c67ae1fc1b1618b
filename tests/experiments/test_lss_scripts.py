"""experiments/lss: flag checks of run.py and step.py, and run.py assembling its results from the committed
per-rank-count points (``--reuse``: no torchrun), its files written whole."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils import argparse_exit

from experiments.lss import run, step

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "lss" / "results"
COMMON_FLAGS = [(["--seq-len", "0"], "--seq-len"), (["--steps", "0"], "--steps"), (["--layers", "-1"], "--layers"),
                (["--hidden", "nan"], "--hidden"), (["--heads", "0"], "--heads")]


@pytest.mark.parametrize("argv, flag", [*COMMON_FLAGS, (["--ranks", "1", "0"], "--ranks"),
                                        (["--kv-heads", "8", "0"], "--kv-heads")])
def test_run_rejects_nonsense_flags(argv, flag, capsys, tmp_path):
    """Argparse error naming the flag, exit 2, before any torchrun is launched or anything written."""
    assert flag in argparse_exit(run.main, [*argv, "--out-dir", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, flag", [*COMMON_FLAGS, (["--kv-heads", "0"], "--kv-heads")])
def test_step_rejects_nonsense_flags(argv, flag, capsys, tmp_path):
    out = tmp_path / "point.json"
    assert flag in argparse_exit(step.main, [*argv, "--out", str(out)], capsys)
    assert not out.exists()


def test_run_reuse_writes_results_from_points(tmp_path):
    """--reuse reads results/points/: JSON, markdown and the figure written (the figure where --figure says, not
    paper_figures/), the measured rows and the model check those of the committed results, no temporary file
    left."""
    shutil.copytree(RESULTS / "points", tmp_path / "points")
    figure = tmp_path / "figure.png"
    subprocess.run([sys.executable, "-m", "experiments.lss.run", "--reuse", "--out-dir", str(tmp_path),
                    "--figure", str(figure)],
                   check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png", "lss_cpu.json", "lss_cpu.md", "points"]
    new, committed = (json.loads(p.read_text()) for p in (tmp_path / "lss_cpu.json", RESULTS / "lss_cpu.json"))
    assert new["environment"]["device_type"] == "cpu"
    for key in ("rows", "seq_len", "steps", "config", "corpus", "strategy", "device"):
        assert new["measured"][key] == committed["measured"][key], key
    assert new["model_check"] == committed["model_check"]
