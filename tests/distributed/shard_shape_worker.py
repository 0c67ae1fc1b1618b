"""torchrun worker for tests/distributed/test_shard_shapes_torchrun.py: ranks of one SP group given shards of
different shapes all get the same clear ValueError (no gloo "Received data size doesn't match", no hang).

    torchrun --standalone --nproc_per_node 2 tests/distributed/shard_shape_worker.py [BACKEND ...]

Per backend, on every rank: (1) ``sp_loss`` with rank r holding a (1, 32 + 8 r) shard, (2) a direct model forward
with rank r holding r + 1 rows, (3) then an equal step on the same group, which must still work (the error leaves
every rank at the same point of the collective sequence), (4) after ``teardown_sequence_parallel`` no check is left.
Each rank prints ``CASE <backend>_<case> OK rank=<r>``. The process group times out after 60 s, so a collective
that would hang fails the run instead.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import mst.distributed as md
from tests.distributed.sp_worker import make_batch, tiny_llama


def expect_mismatch(name: str, fn, *fragments: str) -> None:
    """``fn`` raises ValueError whose message has every fragment; print this rank's CASE line."""
    try:
        fn()
    except ValueError as err:
        missing = [f for f in fragments if f not in str(err)]
        assert not missing, f"{name}: {missing} not in {err}"
        rank = dist.get_rank()
        print(f"CASE {name} OK rank={rank}" + (f" error={err}" if rank == 0 else ""), flush=True)
        return
    raise AssertionError(f"{name}: no ValueError on rank {dist.get_rank()}")


def run_backend(backend: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_llama(kv_heads=2)
    sp = md.setup_sequence_parallel(model, world, backend=backend)
    lengths = [32 + 8 * r for r in range(world)]
    uneven = md.shard_batch(make_batch(1, lengths[rank] * world, seed=rank, ignore=False), sp.rank, sp.size)
    expect_mismatch(f"{backend}_unequal_lengths", lambda: md.sp_loss(model, uneven),
                    "different shapes", *(f"rank {r}: 1 x {n}" for r, n in enumerate(lengths)))

    rows = md.shard_batch(make_batch(rank + 1, 16 * world, seed=rank, ignore=False), sp.rank, sp.size)
    expect_mismatch(f"{backend}_unequal_batches",
                    lambda: model(input_ids=rows["input_ids"], position_ids=rows["position_ids"]),
                    *(f"rank {r}: {r + 1} x 16" for r in range(world)))

    equal = md.shard_batch(make_batch(2, 16 * world, seed=0, ignore=False), sp.rank, sp.size)
    loss = md.sp_loss(model, equal)
    loss.backward()
    md.reduce_gradients(model)
    assert torch.isfinite(loss), f"{backend}: loss {loss}"
    print(f"CASE {backend}_equal_after_error OK rank={rank}", flush=True)

    md.teardown_sequence_parallel(model)
    assert not model._forward_pre_hooks, f"{backend}: the shard check outlived teardown"
    print(f"CASE {backend}_teardown OK rank={rank}", flush=True)


def main() -> None:
    md.init_distributed(device="cpu", timeout_s=60)
    for backend in sys.argv[1:] or list(md.BACKENDS):
        run_backend(backend)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
