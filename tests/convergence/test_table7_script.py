"""experiments/table7/run_table7.py end to end at toy size: results JSON, markdown, curves and figure."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_table7_script_writes_results(tmp_path):
    try:
        from mst.data import gpt2_tokenizer, kjv_verses
        gpt2_tokenizer(), kjv_verses()
    except Exception as e:  # CorpusMissingError: the script would stop with the same message
        pytest.skip(str(e))
    cmd = [sys.executable, str(ROOT / "experiments/table7/run_table7.py"), "--parts", "exact,context",
           "--exact_steps", "2", "--exact_context", "64", "--context_steps", "2", "--context_start", "128",
           "--context_max", "256", "--eval_tokens", "512", "--no_wandb",
           "--work_dir", str(tmp_path / "work"), "--results", str(tmp_path / "results")]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "HF_DATASETS_OFFLINE": "1"})
    res = tmp_path / "results"
    record = json.loads((res / "table7_cpu.json").read_text())
    assert record["exact"]["max_rel_dloss"] < 1e-4
    ctx = record["context"]
    assert ctx["longest"]["mst"] > ctx["longest"]["ac"] and ctx["mst_context"] == 256
    assert ctx["runs"]["ac"]["heldout_own_context"]["tokens"] == ctx["runs"]["mst"]["heldout_own_context"]["tokens"]
    assert (res / "table7_cpu.md").read_text().startswith("# Table 7")
    assert (res / "table7_cpu_loss_curves.png").stat().st_size > 0
    assert {p.name for p in (res / "curves").glob("*.csv")} == {
        "exact_fp32_vanilla.csv", "exact_fp32_mst.csv", "context_ac_128.csv", "context_mst_256.csv"}
