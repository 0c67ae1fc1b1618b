"""Sequence-parallel MsT over gloo with 2 and 4 torchrun processes equals one process (loss and gradients).

Each run starts ``sp_worker.py`` under ``torchrun --standalone``; the worker does the comparisons (see its
docstring) and prints one line per passed case. Cases: vanilla Ulysses and MsT+Ulysses, batch 1 and 2, ignored
labels (including a shard with none valid), an odd length padded to a multiple of sp, an odd length without
padding (error), and on 4 ranks kv-head replication (kv 2 < sp 4), SP 2 x DP 2, and heads not divisible (error).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("sp_worker.py")
ROOT = Path(__file__).resolve().parents[2]

CASES = {
    2: ["vanilla_mha_bs1", "mst_gqa_bs2_ignored", "mst_odd_len_padded", "odd_len_unpadded"],
    4: ["vanilla_mha_bs1", "mst_gqa_bs2_ignored", "mst_odd_len_padded", "odd_len_unpadded",
        "vanilla_kv_replicated_bs2", "mst_sp2_dp2", "heads_not_divisible"],
}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [2, 4])
def test_sequence_parallel_matches_single_process(nproc: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(WORKER)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    for case in CASES[nproc]:
        assert f"CASE {case} OK" in proc.stdout, f"{case} did not pass:\n{out[-6000:]}"
