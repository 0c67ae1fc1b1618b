"""experiments.clients: the measurement scripts of the clients users train with (tiny runs)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_trl_head_writes_peaks_and_times(tmp_path):
    """experiments.clients.trl_head at a toy size: both heads measured, their losses checked equal by the script."""
    subprocess.run([sys.executable, "-m", "experiments.clients.trl_head", "--hidden", "64", "--seq-len", "128",
                    "--steps", "1", "--out", str(tmp_path)], check=True, cwd=ROOT, capture_output=True)
    results = json.loads((tmp_path / "trl_head_cpu.json").read_text())
    assert set(results["peak_bytes"]) == set(results["seconds"]) == {"trl", "mst"}
    assert results["environment"]["device_type"] == "cpu"
    assert "| trl |" in (tmp_path / "trl_head_cpu.md").read_text()
