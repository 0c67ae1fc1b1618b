"""Distributed tests. ``run_sp_worker`` starts ``sp_worker.py`` (or another worker) under ``torchrun --standalone``
(gloo, CPU)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("sp_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def run_sp_worker(nproc: int, *worker_args: str, timeout: int = 600, worker: Path = WORKER) -> tuple[str, str]:
    """Run ``worker`` (default ``sp_worker.py``) on ``nproc`` processes; assert it exited 0; return
    (stdout, stdout + stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), str(worker), *worker_args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return proc.stdout, out
