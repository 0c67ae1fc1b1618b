"""Set up sequence parallelism (SP) on an HF causal LM: groups, validation, and the attention backend.

    sp = mst.distributed.setup_sequence_parallel(model, sp_size=4)        # after torch.distributed is initialised
    shard = mst.distributed.shard_batch(batch, sp.rank, sp.size)           # labels shifted before sharding
    loss = mst.distributed.sp_loss(model, shard)                           # exact global mean loss
    loss.backward(); mst.distributed.reduce_gradients(model)               # one reduction per gradient

Ranks form a 2-D grid, data-parallel replicas x sequence-parallel groups: rank = dp_rank * sp_size + sp_rank,
so each SP group is ``sp_size`` consecutive ranks ([0..sp-1], [sp..2sp-1], ...; on one node when sp_size fits
one), the heavy attention traffic stays inside it, and only the gradient all-reduce spans the grid. The backend
is chosen by name from ``BACKENDS`` (one ``Backend`` row each: validate, install, uninstall):
- "ulysses": DeepSpeed-Ulysses, all-to-all heads <-> sequence around attention (heads must split over sp);
- "lss": the LSS Transformer's segment attention, one fused all-gather of [K; V] per layer, any head count, and
  double gradient averaging (``double_averaging``: the gradient all-reduce averages over the whole grid);
- "allgather": the naive baseline (all-gather of the full Q, K, V activations, full attention on every rank).
Nothing else in the SP path (sharding, loss, gradient reduction) depends on the backend.

MsT composes unchanged: ``mst.apply`` patches the MLPs and LM-head, which are token-wise and simply see the local
shard; order of the two calls does not matter.

Equal shards: every rank of an SP group must hold a shard of the same (batch, tokens) shape, since the attention
collectives exchange equal-sized pieces (with unequal ones gloo aborts with "Received data size doesn't match" and
NCCL hangs). ``setup_sequence_parallel`` therefore adds a forward pre-hook to the model that all-gathers the local
shape once per forward (two integers; not per layer) and raises the same ``ValueError``, naming every rank's shape,
on every rank. ``shard_batch`` makes equal shards: a length not divisible by the SP size is an error, or with
``pad=True`` is padded exactly (ignored labels at the end).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from . import lss, ulysses
from .routing import unroute


@dataclass(frozen=True)
class SequenceParallel:
    """Where this rank sits: its SP group (None when size == 1), rank in it, and the data-parallel degree."""

    size: int
    rank: int
    group: Any
    backend: str  # the attention backend, a key of BACKENDS (not the process-group backend)
    dp_size: int = 1
    dp_rank: int = 0  # which data-parallel replica (row of the SP x DP grid) this rank belongs to


@dataclass(frozen=True)
class Backend:
    """One way of running attention over a sequence split across ranks."""

    validate: Callable[[Any, int], None]  # (model config, sp_size) -> raise ValueError if unsupported
    install: Callable[[nn.Module, Any], None]  # (model, SP process group)
    uninstall: Callable[[nn.Module], None]
    # LSS: each rank's loss term is scaled by sp and gradients are averaged over all sp x dp ranks, instead of
    # summed over SP and averaged over DP (the same numbers; see mst.distributed.loss)
    double_averaging: bool = False


BACKENDS: dict[str, Backend] = {
    "ulysses": Backend(ulysses.validate, ulysses.install, unroute),
    "lss": Backend(lss.validate, lss.install, unroute, double_averaging=True),
    "allgather": Backend(lss.validate, lss.install_allgather, unroute),
}


def validate_sp_config(config: Any, sp_size: int, backend: str = "ulysses") -> None:
    """Raise ``ValueError`` when ``config`` cannot be split over ``sp_size`` ranks by ``backend``."""
    if not isinstance(sp_size, int) or isinstance(sp_size, bool) or sp_size < 1:
        raise ValueError(f"sp_size must be a positive integer, got {sp_size!r}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown sequence-parallel backend {backend!r}; available: {sorted(BACKENDS)}")
    BACKENDS[backend].validate(config, sp_size)


def _check_world(sp_size: int) -> None:
    """SP groups tile the world: ``sp_size`` must divide the number of processes."""
    world = dist.get_world_size()
    if world % sp_size:
        raise ValueError(f"sp_size={sp_size} must divide the world size {world} (the SP x DP grid tiles the ranks)")


def _new_groups(sp_size: int) -> tuple[Any, int, int, int]:
    """Create every rank's SP group (all ranks call this together); returns (my group, SP rank, dp, dp rank)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for start in range(0, world, sp_size):
        group = dist.new_group(list(range(start, start + sp_size)))
        if start <= rank < start + sp_size:
            mine = group
    return mine, rank % sp_size, world // sp_size, rank // sp_size


def setup_sequence_parallel(model: nn.Module, sp_size: int, backend: str = "ulysses") -> SequenceParallel:
    """Make ``model`` run sequence-parallel over groups of ``sp_size`` ranks, in place; returns the placement.

    Must be called by every rank (it creates process groups). With ``sp_size == 1`` nothing is installed and the
    SP helpers degrade to single-process behaviour (no torch.distributed needed). Calling it again replaces the
    previous setup. The placement is stored as ``model.mst_sp`` for ``sp_loss`` / ``reduce_gradients``.
    """
    validate_sp_config(model.config, sp_size, backend)
    distributed = dist.is_available() and dist.is_initialized()
    if sp_size > 1:  # refused before teardown, so a failed call leaves the previous setup in place
        if not distributed:
            raise RuntimeError(f"sp_size={sp_size} needs torch.distributed initialised first "
                               "(torchrun / SLURM: see mst.distributed.init_distributed)")
        _check_world(sp_size)
    teardown_sequence_parallel(model)
    if sp_size == 1:
        dp = dist.get_world_size() if distributed else 1
        dp_rank = dist.get_rank() if dp > 1 else 0
        sp = SequenceParallel(size=1, rank=0, group=None, backend=backend, dp_size=dp, dp_rank=dp_rank)
    else:
        group, rank, dp, dp_rank = _new_groups(sp_size)
        BACKENDS[backend].install(model, group)
        sp = SequenceParallel(size=sp_size, rank=rank, group=group, backend=backend, dp_size=dp, dp_rank=dp_rank)
        model._mst_sp_shard_check = model.register_forward_pre_hook(_check_shard_hook, with_kwargs=True)
    model.mst_sp = sp
    return sp


def check_equal_shards(inputs: torch.Tensor | None, sp: SequenceParallel,
                       device: torch.device | None = None) -> None:
    """Raise the same ``ValueError`` on every rank of ``sp.group`` unless all ranks hold a (batch, tokens) shard
    of one shape (``inputs``: this rank's ``input_ids`` or ``inputs_embeds``; None counts as no shard).

    One all-gather of two integers on ``inputs``' device (else ``device``: CUDA for NCCL), so a mismatch is
    reported before the attention collectives, which would abort (gloo) or hang (NCCL) on it. Every rank of the
    group must call it, as every rank runs the forward.
    """
    if sp.size == 1:
        return
    local = torch.tensor(tuple(inputs.shape[:2]) if inputs is not None else (-1, -1), dtype=torch.int64,
                         device=inputs.device if inputs is not None else device)
    gathered = local.new_empty(2 * sp.size)
    lss._op("all_gather_single", "all_gather_into_tensor")(gathered, local, group=sp.group)
    shapes = [tuple(row) for row in gathered.view(sp.size, 2).tolist()]
    if len(set(shapes)) > 1:
        ranks = [dist.get_global_rank(sp.group, r) for r in range(sp.size)]
        listed = ", ".join(f"rank {g}: " + ("no input" if b < 0 else f"{b} x {n}")
                           for g, (b, n) in zip(ranks, shapes))
        raise ValueError(f"the sequence-parallel ranks hold shards of different shapes (batch x tokens): {listed}; "
                         "every rank needs an equal share of one batch: use mst.distributed.shard_batch (pad=True "
                         "for a length not divisible by the SP size)")


def _check_shard_hook(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a sequence-parallel model: ``check_equal_shards`` on its input_ids / inputs_embeds."""
    inputs = kwargs.get("input_ids", args[0] if args else None)
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    check_equal_shards(inputs, model.mst_sp, next(model.parameters()).device)


def teardown_sequence_parallel(model: nn.Module) -> nn.Module:
    """Undo ``setup_sequence_parallel`` on ``model``: its attention runs unsharded again, and once no
    sequence-parallel model is left HF's attention registry holds its original functions again."""
    sp = getattr(model, "mst_sp", None)
    if sp is None:
        return model
    if sp.size > 1:
        BACKENDS[sp.backend].uninstall(model)
        model.__dict__.pop("_mst_sp_shard_check").remove()
    del model.mst_sp
    return model
