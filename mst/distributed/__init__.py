"""Distributed MsT: sequence parallelism for HF causal LMs (MsT paper Sec 3.5, App. E, Table 12).

The sequence is split across the ranks of an SP group; attention runs through DeepSpeed-Ulysses (all-to-all
heads <-> sequence), while MsT's mini-sequence MLP and chunked LM-head run on each rank's local shard.

    env = mst.distributed.init_distributed()                       # torchrun or srun; gloo on CPU, NCCL on CUDA
    model = mst.apply(model)                                       # optional: MsT on the local shard
    sp = mst.distributed.setup_sequence_parallel(model, sp_size=env.world_size, backend="ulysses")
    shard = mst.distributed.shard_batch(batch, sp.rank, sp.size)   # labels shifted before sharding
    loss = mst.distributed.sp_loss(model, shard)                   # exact global loss, same on every rank
    loss.backward()
    mst.distributed.reduce_gradients(model)                        # sum over SP, mean over DP, once

Files: ``launch`` (rendezvous from the environment), ``sequence_parallel`` (groups, validation, backend registry),
``ulysses`` (the DeepSpeed-Ulysses backend), ``sharding`` (``shard_batch``), ``loss`` (``sp_loss``,
``reduce_gradients``).
"""
from .launch import DistEnv, init_distributed, rendezvous_from_env
from .loss import reduce_gradients, sp_loss
from .sequence_parallel import (BACKENDS, Backend, SequenceParallel, setup_sequence_parallel,
                                teardown_sequence_parallel, validate_sp_config)
from .sharding import shard_batch

__all__ = ["BACKENDS", "Backend", "DistEnv", "SequenceParallel", "init_distributed", "reduce_gradients",
           "rendezvous_from_env", "setup_sequence_parallel", "shard_batch", "sp_loss", "teardown_sequence_parallel",
           "validate_sp_config"]
