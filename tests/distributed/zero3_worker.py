"""torchrun worker for tests/distributed/test_engines_torchrun.py: mst under DeepSpeed ZeRO-3 equals one plain process.

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 tests/distributed/zero3_worker.py

Every rank builds the same seeded tiny Llama (fp32), computes the loss and gradients of the unpatched model itself
on one batch, then trains a patched copy under a DeepSpeed ZeRO-3 engine (parameters partitioned over the ranks,
gloo, DeepSpeed's CPU accelerator) on that same batch on every rank, so the data-parallel average is the single-
process gradient. The ``*_state_on_host`` cases also put parameters and optimizer state on the host
(``offload_param``, ``offload_optimizer``); the ``ulysses_*`` cases shard the sequence over all ranks;
``mst_uneven_lengths`` feeds each rank a different length. The loss and every gathered full gradient
(``deepspeed.utils.safe_get_full_grad``) must equal the reference (``torch.testing.assert_close`` defaults). Rank 0
prints ``CASE <name> OK loss=...`` per case.
"""
from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from mst.distributed import setup_sequence_parallel, shard_batch, sp_loss
from tests.distributed import WHOLE_LAYER, check_case, reference_and_copy

# persistence threshold 0: every parameter is partitioned (by default DeepSpeed keeps ones under 1e5 elements, i.e.
# all of a tiny model's, whole on every rank)
ZERO3 = {"stage": 3, "stage3_param_persistence_threshold": 0}
CONFIG = {"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True, "zero_optimization": ZERO3,
          "optimizer": {"type": "SGD", "params": {"lr": 0.0}}}
# model state on the host, as ALST trains: parameters and AdamW (DeepSpeedCPUAdam, JIT-built) offloaded to CPU
ON_HOST = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 0.0}},
           "zero_optimization": {**ZERO3, "offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}}}
CASES = {  # name -> (mst.apply options or None for the unpatched model, DeepSpeed config)
    "vanilla": (None, CONFIG),
    "mst": ({"mlp_chunk_tokens": 16}, CONFIG),  # the mini-sequence MLP's recompute gathers the partitioned weights
    "mst_whole_layer": (WHOLE_LAYER, CONFIG),
    "mst_offload": ({"mlp_chunk_tokens": 16, "offload_checkpoints": True}, CONFIG),
    "mst_no_checkpointing": ({"mlp_chunk_tokens": 16, "checkpointing": False}, CONFIG),
    "mst_whole_layer_state_on_host": ({**WHOLE_LAYER, "offload_checkpoints": True}, ON_HOST),
}
ULYSSES_CASES = {  # with Ulysses over all ranks (sp = world size)
    "ulysses_mst": ({"mlp_chunk_tokens": 16}, CONFIG),
    "ulysses_whole_layer_state_on_host": ({**WHOLE_LAYER, "offload_checkpoints": True}, ON_HOST),
}


def run_case(name: str, options: dict | None, config: dict) -> None:
    ref, model, batch, expected = reference_and_copy(options)
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    loss = engine(**batch).loss
    engine.backward(loss)
    torch.testing.assert_close(loss.detach(), expected)
    check_case(name, loss, ((n, safe_get_full_grad(p)) for n, p in engine.module.named_parameters()), ref)
    engine.destroy()


def run_ulysses_case(name: str, options: dict, config: dict) -> None:
    """ZeRO-3 together with DeepSpeed-Ulysses over every rank: each rank feeds its shard of the batch (61 tokens,
    padded to the SP size), ``sp_loss(world_average=True)`` since ZeRO averages gradients over all ranks."""
    ref, model, batch, expected = reference_and_copy(options)
    world = dist.get_world_size()
    sp = setup_sequence_parallel(model, world)
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    shard = shard_batch(batch, dist.get_rank(), world, pad=True)
    loss = sp_loss(engine.module, shard, sp, world_average=True)
    engine.backward(loss)
    torch.testing.assert_close(loss.detach(), expected)
    check_case(name, loss, ((n, safe_get_full_grad(p)) for n, p in engine.module.named_parameters()), ref)
    engine.destroy()


def run_uneven_case(name: str, options: dict, config: dict) -> None:
    """Data parallelism over sequences of different lengths (rank r: 61 - 32 r tokens, so the ranks have different
    MLP and LM-head chunk counts): ZeRO-3 averages the ranks' gradients, the reference is that average computed in
    one process. Each rank must make the same ZeRO-3 module calls (``mst.ops.recompute.chunk_count_over_ranks``);
    before, the ranks' gathers mismatched ("Received data size doesn't match expected size")."""
    import mst
    from tests.utils import clone_model, make_input_ids, make_labels, tiny_model

    world, rank = dist.get_world_size(), dist.get_rank()
    ref = tiny_model("llama")
    model = clone_model(ref)
    batches = []
    for r in range(world):
        ids = make_input_ids(2, 61 - 32 * r, seed=r + 1)
        batches.append({"input_ids": ids, "labels": make_labels(ids, "prefix")})
    for batch in batches:
        (ref(**batch).loss / world).backward()
    expected = ref(**batches[rank]).loss.detach()
    mst.apply(model, **options)
    engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    loss = engine(**batches[rank]).loss
    engine.backward(loss)
    torch.testing.assert_close(loss.detach(), expected)
    check_case(name, loss, ((n, safe_get_full_grad(p)) for n, p in engine.module.named_parameters()), ref)
    engine.destroy()


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    for name, (options, config) in CASES.items():
        run_case(name, options, config)
    for name, (options, config) in ULYSSES_CASES.items():
        run_ulysses_case(name, options, config)
    run_uneven_case("mst_uneven_lengths", {**WHOLE_LAYER, "lm_head_chunk_tokens": 16}, CONFIG)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
