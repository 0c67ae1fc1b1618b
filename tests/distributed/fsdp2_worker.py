"""torchrun worker for tests/distributed/test_engines_torchrun.py: mst under FSDP2 equals one plain process.

    torchrun --standalone --nproc_per_node 2 tests/distributed/fsdp2_worker.py

Every rank builds the same seeded tiny Llama (fp32), computes the unpatched model's loss and gradients on one batch
itself, then shards a patched copy with FSDP2 (``fully_shard`` on every decoder layer and the root, gloo on CPU),
without and with ``CPUOffloadPolicy`` (parameters, gradients and optimizer state on the host), and runs the same batch
on every rank; the Ulysses cases shard the sequence over all ranks (``sp_loss(world_average=True)``: FSDP2 averages
gradients over every rank). The loss and every gathered gradient (``DTensor.full_tensor``) must equal the reference
(``torch.testing.assert_close`` defaults). Rank 0 prints ``CASE <name> OK loss=...`` per case.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

from mst.distributed import setup_sequence_parallel, shard_batch, sp_loss
from tests.distributed import WHOLE_LAYER, check_case, reference_and_copy

CASES = {  # name -> (mst.apply options or None for the unpatched model, model state on the host)
    "vanilla": (None, False),
    "mst": ({"mlp_chunk_tokens": 16}, False),
    "mst_whole_layer": (WHOLE_LAYER, False),
    "vanilla_state_on_host": (None, True),
    "mst_whole_layer_state_on_host": ({**WHOLE_LAYER, "offload_checkpoints": True}, True),
}
ULYSSES_CASES = {"ulysses_mst_whole_layer_state_on_host": ({**WHOLE_LAYER, "offload_checkpoints": True}, True)}


def run_case(name: str, options: dict | None, on_host: bool, ulysses: bool = False) -> None:
    ref, model, batch, expected = reference_and_copy(options)
    world = dist.get_world_size()
    sp = setup_sequence_parallel(model, world) if ulysses else None
    policy = {"offload_policy": CPUOffloadPolicy(pin_memory=False)} if on_host else {}
    for layer in model.model.layers:
        fully_shard(layer, **policy)
    fully_shard(model, **policy)
    if ulysses:
        loss = sp_loss(model, shard_batch(batch, dist.get_rank(), world, pad=True), sp, world_average=True)
    else:
        loss = model(**batch).loss
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected)
    check_case(name, loss, ((n, p.grad.full_tensor()) for n, p in model.named_parameters()), ref)


def main() -> None:
    dist.init_process_group("gloo")
    for name, (options, on_host) in CASES.items():
        run_case(name, options, on_host)
    for name, (options, on_host) in ULYSSES_CASES.items():
        run_case(name, options, on_host, ulysses=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
