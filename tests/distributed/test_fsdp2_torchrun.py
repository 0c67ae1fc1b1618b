"""mst under FSDP2 (``fully_shard`` per decoder layer, gloo on CPU) on 1 and 2 torchrun processes equals the unpatched
model in one process: loss and every gathered gradient, also with ``CPUOffloadPolicy`` (see fsdp2_worker.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed import run_sp_worker

WORKER = Path(__file__).with_name("fsdp2_worker.py")
CASES = ["vanilla", "mst", "mst_whole_layer", "vanilla_state_on_host", "mst_whole_layer_state_on_host"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [1, 2])
def test_fsdp2_matches_single_process(nproc: int) -> None:
    stdout, out = run_sp_worker(nproc, worker=WORKER)
    for case in CASES:
        assert f"CASE {case} OK" in stdout, f"{case} did not pass:\n{out[-6000:]}"
