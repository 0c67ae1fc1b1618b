"""The exact sequence-parallel loss and the one gradient reduction per step.

Loss. With shards r = 0..sp-1 holding n_r valid (non-ignored) labels and summed cross-entropy s_r, the loss of the
unsharded batch is L = sum_r s_r / N with N = sum_r n_r (HF's mean over valid tokens, also for uneven shards,
e.g. a last shard full of ignored or padded labels). Each rank
1. all-reduces its count n_r (an integer, no gradient) to get N,
2. runs the model on its shard with ``num_items_in_batch=N``, which yields l_r = s_r / N (HF and ``mst.apply``
   both divide the summed loss by ``num_items_in_batch``),
3. returns L = sum_r l_r through ``_SumOverGroup``: an all-reduce in forward whose backward is the identity.

Why the identity backward is exact: every rank calls ``L.backward()`` on its own copy, seeding dL/dl_r = 1 on its
own term; the graph of l_r reaches other ranks only through Ulysses' all-to-alls, whose backward sends each
gradient back to the rank that produced the activation. Summed over ranks, the parameter gradients are exactly
dL/dtheta. (``torch.distributed.nn.all_reduce`` would all-reduce the seeds too and scale gradients by sp.)

Gradients. The parameters are replicated, so rank r holds only its partial dL/dtheta. ``reduce_gradients`` sums
them over the SP group and averages over data-parallel replicas in the same collective (an all-reduce over the
whole world divided by dp), once per step, in dtype buckets. Under DDP / ZeRO, which average over every rank, let
those reduce instead and pass ``sp_loss(..., world_average=True)`` (the double-averaging seed below).

Double gradient averaging (LSS, backends with ``double_averaging``): the LSS Transformer averages gradients over
the sequence-parallel and data-parallel groups together, i.e. one all-reduce over the whole sp x dp grid divided by
sp * dp. For that average to be the gradient of the global mean loss, each rank's term is seeded with sp * l_r =
s_r / (N / sp) (its summed loss over the mean valid-label count per segment) in ``_SumOverGroup``'s backward.
This is the same number as the default "sum over SP, mean over DP" (sp * g / (sp * dp) = g / dp), one all-reduce
either way; it is written out so that the LSS path reads as the paper describes it. The paper averages each
segment's own mean loss, which equals this only when every segment has the same number of valid labels; dividing
by the global count keeps ignored labels and padding exact.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .sequence_parallel import BACKENDS, SequenceParallel


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) of one scalar over ``group`` in forward; backward seeds this rank's term with
    ``seed_scale`` x the incoming gradient: 1 (identity, see module docstring), or sp under double averaging."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group, seed_scale: int) -> torch.Tensor:
        ctx.seed_scale = seed_scale
        total = local.detach().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.seed_scale if ctx.seed_scale != 1 else grad, None, None


def _placement(model: nn.Module, sp: SequenceParallel | None) -> SequenceParallel:
    """The given placement, else the model's (``setup_sequence_parallel``), else plain data parallelism."""
    sp = sp if sp is not None else getattr(model, "mst_sp", None)
    if sp is not None:
        return sp
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return SequenceParallel(size=1, rank=0, group=None, backend="ulysses", dp_size=world)


def sp_loss(model: nn.Module, shard: Mapping[str, torch.Tensor], sp: SequenceParallel | None = None, *,
            ignore_index: int = -100, world_average: bool = False) -> torch.Tensor:
    """Forward ``model`` on this rank's ``shard`` (from ``shard_batch``) and return the exact global mean loss.

    Works for an unpatched HF model (vanilla Ulysses: HF's loss with ``shift_labels``) and for one patched by
    ``mst.apply`` (chunked LM-head). The returned value is identical on all ranks of the SP group; call
    ``.backward()`` on every rank, then ``reduce_gradients(model)``. ``world_average=True`` when an engine reduces
    the gradients instead by averaging over every rank, SP ranks included (DeepSpeed ZeRO, DDP over the world):
    each rank's term is then seeded with sp, as under double averaging (module docstring).
    """
    sp = _placement(model, sp)
    labels = shard["shift_labels"]
    count = (labels != ignore_index).sum()
    if sp.size > 1:
        dist.all_reduce(count, group=sp.group)
    out = model(input_ids=shard["input_ids"], position_ids=shard["position_ids"], labels=labels,
                shift_labels=labels, num_items_in_batch=count, ignore_index=ignore_index, use_cache=False)
    if sp.size == 1:
        return out.loss
    averaged = world_average or BACKENDS[sp.backend].double_averaging
    return _SumOverGroup.apply(out.loss, sp.group, sp.size if averaged else 1)


def reduce_gradients(model: nn.Module, sp: SequenceParallel | None = None, *,
                     bucket_bytes: int = 1024 ** 2) -> None:
    """Sum the parameter gradients over the SP group and average them over data-parallel replicas, in place
    (under double averaging, LSS: average over all sp x dp ranks; the same result, see the module docstring).

    Gradients smaller than ``bucket_bytes`` are packed into buckets of at most that size (one all-reduce each,
    costing one bucket of extra memory); larger ones are all-reduced in place. The small default keeps the extra
    memory at 1 MiB, which matters when memory, not bandwidth, is what limits the sequence length.
    Missing gradients of trainable parameters are treated as zeros so every rank reduces the same buckets.
    """
    _check_bucket_bytes(bucket_bytes)  # also in one process, where nothing is reduced
    sp = _placement(model, sp)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    divisor = sp.size * sp.dp_size if BACKENDS[sp.backend].double_averaging else sp.dp_size
    for bucket in gradient_buckets([p.grad for p in params], bucket_bytes):
        _reduce(bucket, divisor)


def _check_bucket_bytes(bucket_bytes: int) -> None:
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")


def gradient_buckets(grads: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """The all-reduce buckets of ``reduce_gradients``: per dtype, in order, ``_buckets`` of ``grads``."""
    _check_bucket_bytes(bucket_bytes)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    return [bucket for same_dtype in by_dtype.values() for bucket in _buckets(same_dtype, bucket_bytes)]


def _buckets(grads: list[torch.Tensor], limit: int):
    """Consecutive groups of gradients of at most ``limit`` bytes; a gradient of ``limit`` or more goes alone."""
    bucket, size = [], 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if nbytes >= limit:
            yield [g]
            continue
        if size + nbytes > limit:
            yield bucket
            bucket, size = [], 0
        bucket.append(g)
        size += nbytes
    if bucket:
        yield bucket


def _reduce(grads: list[torch.Tensor], divisor: int) -> None:
    """One all-reduce (sum over the world) of ``grads``, in place, divided by ``divisor`` (dp, or sp * dp)."""
    flat = grads[0] if len(grads) == 1 else _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    if divisor > 1:
        flat.div_(divisor)
    if len(grads) > 1:
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)
