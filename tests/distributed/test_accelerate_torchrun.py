"""mst trained through accelerate (DDP over gloo on CPU, gradient accumulation) on 1 and 2 torchrun processes equals
the unpatched model in one process: every micro-batch's loss and the window's gradients (see accelerate_worker.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed import run_sp_worker

WORKER = Path(__file__).with_name("accelerate_worker.py")
CASES = ["vanilla", "mst", "mst_whole_layer"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [1, 2])
def test_accelerate_ddp_matches_single_process(nproc: int) -> None:
    stdout, out = run_sp_worker(nproc, worker=WORKER)
    for case in CASES:
        assert f"CASE {case} OK" in stdout, f"{case} did not pass:\n{out[-6000:]}"
