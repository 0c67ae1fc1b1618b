"""experiments.long_context: the ladder's rungs, its full-size rows, tables and figure, and a smoke run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.long_context.ladder import ALST, RUNGS, full_size, markdown, plot
from experiments.results import environment
from mst.memory.planner import max_seq_len

ROOT = Path(__file__).resolve().parents[2]


def test_rungs_add_one_thing_each():
    names = [r.name for r in RUNGS]
    assert names[:3] == ["vanilla", "AC", "MsT"] and names[-1] == "+ Ulysses x 8"
    host = [r for r in RUNGS if r.model_state == "host"]
    assert host and all(r.optimizer == "adamw" for r in host)  # DeepSpeedCPUAdam steps on the host
    assert all(r.optimizer == "adamw_in_backward" for r in RUNGS if r.model_state == "device")


def test_full_size_row_is_the_planner_limit_and_the_tables_show_it(tmp_path):
    mst = RUNGS[2]
    row = full_size(mst, "1x80", 4096)
    assert row["max_seq_len"] == max_seq_len("llama3-8b", "mst", optimizer="adamw_in_backward", granularity=4096)
    assert row["host_gib_node"] == 0 and row["step_cost"]["step_s"] > 0
    result = {"model": "llama3-8b", "environment": environment("cpu"), "alst": ALST,
              "targets": {k: 2 * v[0] for k, v in ALST.items()}, "complete": True,
              "rungs": [{"rung": mst.name, "full": {"1x80": row},
                         "measured": {"measured": 1000, "planner": 1010, "error_pct": 1.0, "hidden": 128,
                                      "layers": 32}},
                        {"rung": RUNGS[5].name, "full": {}, "measured": {"skipped": "host and device are one"}}]}
    text = markdown(result)
    assert f"| MsT | {row['max_seq_len'] / 1e3:.0f}K |" in text
    assert "| DeepSpeed ALST (published) | 500K | 1.20M | 3.70M |" in text
    assert "| target (2 x ALST) | 1.00M | 2.40M | 7.40M |" in text
    assert "| MsT (d=128, L=32) | 1000 tok | 1010 tok | +1.0 |" in text
    assert "Not measured here: host and device are one." in text
    plot(result, tmp_path / "ladder.png")
    assert (tmp_path / "ladder.png").stat().st_size > 0


def test_unknown_rung_is_refused():
    proc = subprocess.run([sys.executable, "-m", "experiments.long_context.ladder", "--rungs", "MsT", "warp"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown rungs ['warp']" in proc.stderr


@pytest.mark.slow
def test_quick_run_measures_and_writes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    subprocess.run([sys.executable, "-m", "experiments.long_context.ladder", "--quick", "--hidden", "64",
                    "--rungs", "vanilla", "MsT", "--out", str(tmp_path), "--figures", str(tmp_path)],
                   check=True, cwd=ROOT, capture_output=True, env=env)
    result = json.loads((tmp_path / "ladder_quick_cpu.json").read_text())
    assert result["complete"] and [r["rung"] for r in result["rungs"]] == ["vanilla", "MsT"]
    vanilla, mst = (r["measured"] for r in result["rungs"])
    assert 0 < vanilla["measured"] < mst["measured"]  # MsT trains longer sequences under the same budget
    assert (tmp_path / "long_context_ladder_quick.png").exists()
