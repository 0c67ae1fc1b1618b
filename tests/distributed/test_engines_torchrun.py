"""mst under the engines users train with, on 1 and 2 torchrun processes (gloo, CPU), equals the unpatched model in
one process: loss and every (gathered) gradient. Each worker's docstring says what it runs:

- ``zero3_worker.py``: DeepSpeed ZeRO-3 (every parameter partitioned; DeepSpeed's CPU accelerator), also with
  parameters and AdamW offloaded to the host, together with DeepSpeed-Ulysses over all ranks, and over sequences of
  different lengths per rank. The regression it guards: the mini-sequence MLP's backward failed under ZeRO-3
  ("LinearFunctionForZeroStage3Backward returned an invalid gradient at index 1 - got [32, 64] but expected shape
  compatible with [0]"; ``mst.ops.mini_sequence_mlp._zero3_backward``).
- ``fsdp2_worker.py``: FSDP2 ``fully_shard`` per decoder layer, also with ``CPUOffloadPolicy``, and with Ulysses.
- ``accelerate_worker.py``: accelerate's DDP with gradient accumulation (``Accelerator.accumulate``).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed import run_sp_worker

HERE = Path(__file__).parent
ENGINES = {  # worker -> the cases it prints (its CASES)
    "zero3_worker.py": ["vanilla", "mst", "mst_whole_layer", "mst_offload", "mst_no_checkpointing",
                        "mst_whole_layer_state_on_host", "ulysses_mst", "ulysses_whole_layer_state_on_host",
                        "mst_uneven_lengths"],
    "fsdp2_worker.py": ["vanilla", "mst", "mst_whole_layer", "vanilla_state_on_host",
                        "mst_whole_layer_state_on_host", "ulysses_mst_whole_layer_state_on_host"],
    "accelerate_worker.py": ["vanilla", "mst", "mst_whole_layer"],
}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("worker", sorted(ENGINES))
def test_engine_matches_single_process(worker: str, nproc: int, monkeypatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # DeepSpeed on a machine without GPUs (zero3_worker)
    stdout, out = run_sp_worker(nproc, worker=HERE / worker)
    for case in ENGINES[worker]:
        assert f"CASE {case} OK" in stdout, f"{case} did not pass:\n{out[-6000:]}"
