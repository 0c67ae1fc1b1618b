"""experiments/table6/run.py end to end at toy size: round-robin timings, larger-batch search, JSON and figure."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_table6_driver_writes_results(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    subprocess.run([sys.executable, str(ROOT / "experiments/table6/run.py"), "--hidden", "32", "--layers", "2",
                    "--steps", "2", "--out", str(tmp_path)], check=True, cwd=ROOT, env=env)
    results = json.loads((tmp_path / "table6_cpu.json").read_text())
    first = results["groups"][0]
    assert list(first["cells"]) == ["vanilla", "ac", "mst"]
    assert all(len(c["times_s"]) == 2 for c in first["cells"].values())
    assert results["mlp_extra_forward"]["passes_per_step"] == {"vanilla": 1.0, "ac": 2.0, "mst": 2.0}
    larger = results["larger_batch"]
    assert larger["mst"]["max_batch"] >= larger["ac"]["max_batch"] >= 1  # RSS-measured at toy size: noisy
    assert len(results["load_average"]["start"]) == 3
    assert (tmp_path / "table6_cpu.md").read_text().startswith("# Table 6")
    assert (tmp_path / "table6_cpu.png").stat().st_size > 0
