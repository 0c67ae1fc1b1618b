"""Shards of different shapes on the ranks of an SP group: one clear ValueError on every rank, for every backend,
within a timeout (gloo used to abort with "Received data size doesn't match"; NCCL would hang).

Runs ``shard_shape_worker.py`` on 2 gloo processes (see its docstring): unequal lengths through ``sp_loss``,
unequal batch sizes through a direct model forward, an equal step afterwards on the same group, and teardown.
"""
from __future__ import annotations

import pytest

from mst.distributed import BACKENDS
from tests.distributed import WORKER, run_sp_worker

SHAPE_WORKER = WORKER.with_name("shard_shape_worker.py")
CASES = ("unequal_lengths", "unequal_batches", "equal_after_error", "teardown")


@pytest.mark.distributed
def test_unequal_shards_fail_clearly_on_every_rank() -> None:
    stdout, out = run_sp_worker(2, *BACKENDS, timeout=420, worker=SHAPE_WORKER)
    for backend in BACKENDS:
        for case in CASES:
            for rank in (0, 1):
                line = f"CASE {backend}_{case} OK rank={rank}"
                assert line in stdout, f"no {line!r}:\n{out[-6000:]}"
