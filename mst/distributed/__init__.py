"""Distributed MsT: sequence parallelism for HF causal LMs (MsT paper Sec 3.5, App. E, Table 12; LSS Transformer).

The sequence is split across the ranks of an SP group; attention runs through one of three backends, while MsT's
mini-sequence MLP and chunked LM-head run on each rank's local shard:
- "ulysses": DeepSpeed-Ulysses (all-to-all heads <-> sequence; heads must split over the SP size);
- "lss": the LSS Transformer (arXiv 2311.02382): each rank attends its own segment against one fused all-gather
  of [K; V], gradients double-averaged over the sequence x data grid; any head count;
- "allgather": the naive baseline (all-gather of full Q, K, V, full attention on every rank), for comparison.

    env = mst.distributed.init_distributed()                       # torchrun or srun; gloo on CPU, NCCL on CUDA
    model = mst.apply(model)                                       # optional: MsT on the local shard
    sp = mst.distributed.setup_sequence_parallel(model, sp_size=env.world_size, backend="lss")   # or "ulysses"
    shard = mst.distributed.shard_batch(batch, sp.rank, sp.size)   # labels shifted before sharding
    loss = mst.distributed.sp_loss(model, shard)                   # exact global loss, same on every rank
    loss.backward()
    mst.distributed.reduce_gradients(model)                        # one all-reduce over the SP x DP grid

Files: ``launch`` (rendezvous from the environment), ``sequence_parallel`` (SP x DP grid, validation, backend
registry), ``routing`` (HF's attention registry routed per model while a model is sequence-parallel, restored
by teardown), ``ulysses`` (DeepSpeed-Ulysses), ``lss`` (LSS segment attention and the all-gather baseline),
``sharding`` (``shard_batch``; every rank's shard must have one shape, checked once per forward by
``check_equal_shards``), ``loss`` (``sp_loss``, ``reduce_gradients``, double averaging), ``comm_stats``
(``count_collectives`` and the communication model ``predict_step``).
"""
from .comm_stats import CommStats, count_collectives, predict_step
from .launch import DistEnv, init_distributed, rendezvous_from_env
from .loss import reduce_gradients, sp_loss
from .sequence_parallel import (BACKENDS, Backend, SequenceParallel, check_equal_shards, setup_sequence_parallel,
                                teardown_sequence_parallel, validate_sp_config)
from .sharding import shard_batch

__all__ = ["BACKENDS", "Backend", "CommStats", "DistEnv", "SequenceParallel", "check_equal_shards",
           "count_collectives", "init_distributed", "predict_step", "reduce_gradients", "rendezvous_from_env",
           "setup_sequence_parallel", "shard_batch", "sp_loss", "teardown_sequence_parallel", "validate_sp_config"]
