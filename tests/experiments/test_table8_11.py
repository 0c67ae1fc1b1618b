"""experiments.table8_11.run end to end at toy size: JSON, markdown and the three figures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_table8_11_driver_writes_results(tmp_path):
    subprocess.run([sys.executable, "-m", "experiments.table8_11.run", "--hidden", "32", "--layers", "2",
                    "--out", str(tmp_path), "--figures", str(tmp_path)], check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    results = json.loads((tmp_path / "table8_11_cpu.json").read_text())
    ladder = results["ladder"]
    assert list(ladder) == ["table8", "table9", "table10", "table11"]
    peaks = [ladder[t]["measured"]["peak_bytes"] for t in ladder]
    assert peaks[2] < peaks[1] and peaks[3] <= peaks[2]  # AC and MsT shrink the peak
    assert max(ladder["table8"]["measured"]["timeline"]["bytes"]) == peaks[0]
    assert set(results["fig3"]) == {"llama3-8b", "gemma2-9b"}
    assert (tmp_path / "table8_11_cpu.md").read_text().startswith("# Tables 8-11")
    for png in ("fig7_11_memory_breakdown.png", "fig7_11_memory_timelines.png", "fig3_memory_20k.png"):
        assert (tmp_path / png).stat().st_size > 0


@pytest.mark.parametrize("argv, flag", [(["--layers", "0"], "--layers"), (["--hidden", "nan"], "--hidden")])
def test_table8_11_rejects_nonsense_flags(argv, flag, capsys, tmp_path):
    """Argparse error naming the flag, exit 2, nothing written."""
    from experiments.table8_11 import run
    from tests.utils import argparse_exit

    assert flag in argparse_exit(run.main, [*argv, "--out", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()
