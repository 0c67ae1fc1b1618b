"""One sequence-parallel training step, shared by Table 12 (max length vs ranks) and the LSS experiment.

Every rank holds the same seeded model and calls ``step`` with the same global batch, in the same order: the rank
takes its shard (``shard_batch``), computes the exact global loss (``sp_loss``), backpropagates, all-reduces the
gradients over the SP group (``reduce_gradients``) and takes an AdamW step. One class, so the step whose memory
Table 12 measures is the step whose communication and time LSS measures.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn

import mst.distributed as md

from .timing import sync


class TimedStep(NamedTuple):
    loss: float
    seconds: float  # this rank's wall seconds; ``all_max`` gives the slowest rank's
    comm: md.CommStats | None  # the step's collectives on this rank (``count=True``), else None


def all_max(value: int | float) -> int | float:
    """Largest ``value`` over all ranks (the slowest rank's time, the largest rank's peak), of the same type: ints
    travel as int64 so byte counts stay exact. Every rank must call it; without a process group it is ``value``."""
    if not dist.is_initialized():
        return value
    exact = isinstance(value, int)
    t = torch.tensor([value], dtype=torch.int64 if exact else torch.float64)
    if dist.get_backend() == "nccl":  # NCCL reduces device tensors only
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) if exact else float(t.item())


def barrier(device: str | torch.device) -> None:
    """Device work finished, then all ranks at this point (so a timed region starts together on every rank)."""
    sync(device)
    if dist.is_initialized():
        dist.barrier()


class SPStep:
    """A sequence-parallel model with its optimizer: ``step(ids)`` trains on one global batch.

    ``sp`` comes from ``mst.distributed.setup_sequence_parallel(model, ...)``. AdamW runs with ``foreach=False``:
    the per-parameter update has no multi-tensor temporaries, so its peak is the same whatever the grouping of
    parameters, and a memory search measures the sequence, not the optimizer's batching.
    """

    def __init__(self, model: nn.Module, sp: md.SequenceParallel, device: str | torch.device,
                 lr: float = 1e-5) -> None:
        self.model, self.sp, self.device = model, sp, torch.device(device)
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, foreach=False)

    @property
    def track(self) -> list:
        """What ``measure_peak`` attributes by name: the model (weights, gradients) and the optimizer (states)."""
        return [self.model, self.opt]

    def step(self, ids: torch.Tensor) -> float:
        """One training step on the global batch ``ids`` (B, S), the same on every rank (labels = ids); the loss."""
        shard = md.shard_batch({"input_ids": ids, "labels": ids}, self.sp.rank, self.sp.size)
        loss = md.sp_loss(self.model, {k: v.to(self.device) for k, v in shard.items()}, self.sp)
        loss.backward()
        md.reduce_gradients(self.model, self.sp)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def timed_step(self, ids: torch.Tensor, count: bool = False) -> TimedStep:
        """``step`` timed from a barrier (all ranks start together) to the end of this rank's device work; with
        ``count``, inside ``count_collectives`` (calls and bytes of every collective this rank issues)."""
        barrier(self.device)
        start = time.perf_counter()
        with md.count_collectives() if count else nullcontext() as comm:
            loss = self.step(ids)
        sync(self.device)
        return TimedStep(loss, time.perf_counter() - start, comm)

    @staticmethod
    def all_max(value: int | float) -> int | float:
        """Largest ``value`` over all ranks (see the module function)."""
        return all_max(value)
