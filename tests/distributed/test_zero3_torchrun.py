"""mst under DeepSpeed ZeRO-3 (parameters partitioned, gloo, DeepSpeed's CPU accelerator) on 1 and 2 torchrun
processes equals the unpatched model in one process: loss and every gathered gradient (see zero3_worker.py), also
with parameters and optimizer state offloaded to the host.

The regression it guards: the mini-sequence MLP's backward used to fail under ZeRO-3 ("LinearFunctionForZeroStage3
Backward returned an invalid gradient at index 1 - got [32, 64] but expected shape compatible with [0]"): the
partitioned weights were declared as autograd inputs while empty (``mst.ops.mini_sequence_mlp._zero3_backward``).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed import run_sp_worker

WORKER = Path(__file__).with_name("zero3_worker.py")
CASES = ["vanilla", "mst", "mst_whole_layer", "mst_offload", "mst_no_checkpointing",
         "mst_whole_layer_state_on_host"]  # zero3_worker.CASES


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [1, 2])
def test_zero3_matches_single_process(nproc: int, monkeypatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    stdout, out = run_sp_worker(nproc, worker=WORKER)
    for case in CASES:
        assert f"CASE {case} OK" in stdout, f"{case} did not pass:\n{out[-6000:]}"
