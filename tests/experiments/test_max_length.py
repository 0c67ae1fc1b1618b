"""experiments/max_length.py (Tables 2-5) end to end at toy size: planner-seeded searches, JSON/markdown/figure,
and clear errors for bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "experiments/max_length.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}


@pytest.mark.slow
def test_driver_measures_every_strategy(tmp_path):
    subprocess.run([sys.executable, SCRIPT, "--table", "table2", "--models", "llama3-8b", "--layers", "2",
                    "--hidden", "32", "--strategies", "vanilla", "mst", "--out", str(tmp_path)],
                   check=True, cwd=ROOT, env=ENV)
    result = json.loads((tmp_path / "max_length_cpu.json").read_text())
    cells = result["models"][0]["strategies"]
    assert list(cells) == ["vanilla", "mst"]
    for cell in cells.values():
        search = cell["search"]
        assert search["seed"] == cell["planner_small"]  # the planner on the measured setting starts the search
        assert cell["measured_small"] > 0 and search["budget_bytes"] > 0
        assert search["trials"][0]["seq_len"] == pytest.approx(cell["planner_small"], rel=0.05)
        fits = [t["seq_len"] for t in search["trials"] if t["fits"]]
        fails = [t["seq_len"] for t in search["trials"] if not t["fits"]]
        assert max(fits) == cell["measured_small"] and all(f > cell["measured_small"] for f in fails)
    assert cells["mst"]["measured_small"] > cells["vanilla"]["measured_small"]
    assert (tmp_path / "max_length_cpu.md").read_text().startswith("# table2")
    assert (tmp_path / "max_length_cpu.png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--strategies", "mst+fp8"], "unknown strategy 'mst+fp8'"),
    (["--models", "gpt-7b", "--strategies", "mst"], "gpt-7b"),
    (["--device", "cuda"], "cuda"),
])
def test_bad_input_fails_clearly(tmp_path, args, message):
    if "cuda" in args:
        pytest.importorskip("torch")
        import torch
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "max_length_cpu.json").exists()
