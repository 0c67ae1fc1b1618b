"""Count the collectives of a training step, and predict them: calls, payload bytes and per-rank wire bytes.

    with mst.distributed.count_collectives() as comm:
        loss = sp_loss(model, shard); loss.backward(); reduce_gradients(model)
    comm.summary()      # {"all_gather_into_tensor": {"calls": 4, "payload_bytes": ..., "wire_bytes": ...}, ...}

``count_collectives`` wraps the ``torch.distributed`` functions that ``mst.distributed`` and DeepSpeed-Ulysses
call (``deepspeed.comm`` looks ``torch.distributed.<op>`` up at call time, so its all-to-alls are counted too) and
records each call from its tensor sizes and group size. Nothing is timed or sniffed on the network:
- payload bytes: the full tensor the collective is about (the gathered output, the reduce-scatter input, the
  all-reduced tensor, the all-to-all input);
- wire bytes: what one rank sends for it with ring / pairwise algorithms, NCCL's bus-bandwidth convention:
  (P-1)/P x payload, 2 (P-1)/P x payload for all-reduce, P = group size.

``predict_step`` is the analytic model of the same quantities for one training step (``sp_loss``, backward,
``reduce_gradients``) from the model's shape alone, so it can be checked against the counts on CPU and then
extrapolated to sizes no machine here can run.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist

# op -> the argument holding the payload tensor (a list of tensors for all_gather)
COUNTED = {"all_reduce": "tensor", "all_gather": "tensor_list", "all_gather_into_tensor": "output_tensor",
           "reduce_scatter_tensor": "input", "all_to_all_single": "input", "all_gather_single": "output_tensor",
           "reduce_scatter_single": "input"}
# torch >= 2.13 names the tensor gather / reduce-scatter *_single (the old names forward to them); both count
# under the old names, which torch 2.11 (the GPU image) still uses
ALIASES = {"all_gather_single": "all_gather_into_tensor", "reduce_scatter_single": "reduce_scatter_tensor"}


def wire_factor(op: str, group_size: int) -> float:
    """Bytes one rank sends per payload byte (ring all-reduce sends twice: reduce-scatter, then all-gather)."""
    share = (group_size - 1) / group_size
    return 2 * share if op == "all_reduce" else share


@dataclass
class CommStats:
    """Per-op totals of the collectives recorded so far on this rank."""

    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    payload_bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    wire_bytes: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def record(self, op: str, payload: int, group_size: int) -> None:
        self.calls[op] += 1
        self.payload_bytes[op] += payload
        self.wire_bytes[op] += payload * wire_factor(op, group_size)

    def summary(self) -> dict[str, dict[str, float]]:
        return {op: {"calls": self.calls[op], "payload_bytes": self.payload_bytes[op],
                     "wire_bytes": self.wire_bytes[op]} for op in sorted(self.calls)}

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_wire_bytes(self) -> float:
        return sum(self.wire_bytes.values())


def _nbytes(payload) -> int:
    tensors = payload if isinstance(payload, (list, tuple)) else [payload]
    return sum(t.numel() * t.element_size() for t in tensors)


@contextlib.contextmanager
def count_collectives() -> Iterator[CommStats]:
    """Record every counted ``torch.distributed`` collective issued inside the block (not reentrant-safe across
    threads; nested calls made by a counted op itself are not double counted)."""
    stats = CommStats()
    originals = {op: getattr(dist, op) for op in COUNTED if hasattr(dist, op)}
    depth = [0]

    def counted(op: str, fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if depth[0] == 0:
                bound = signature.bind(*args, **kwargs)
                group = bound.arguments.get("group")
                stats.record(ALIASES.get(op, op), _nbytes(bound.arguments[COUNTED[op]]), dist.get_world_size(group))
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
        return wrapper

    for op, fn in originals.items():
        setattr(dist, op, counted(op, fn))
    try:
        yield stats
    finally:
        for op, fn in originals.items():
            setattr(dist, op, fn)


def predict_step(backend: str, *, sp_size: int, dp_size: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                 batch: int, seq_len: int, grad_bytes: int, grad_buckets: int = 1, act_bytes: int = 4,
                 recompute: bool = False) -> dict[str, dict[str, float]]:
    """Collectives of one ``sp_loss`` + backward + ``reduce_gradients`` step on one rank, per op (as ``summary``).

    Activation collectives, per layer (n = batch * seq_len / sp_size tokens per rank, b = ``act_bytes``):
    - "lss": one all-gather of [K; V] in forward, payload sp_size * n * 2 kv_heads * head_dim * b; one reduce-scatter of
      the same size in backward;
    - "allgather": the same with [Q; K; V] (heads + 2 kv_heads);
    - "ulysses": four all-to-alls (Q, K, V, output) in forward and four in backward, K/V with kv heads replicated
      up to sp_size when kv_heads < sp_size, plus an all-gather of the int64 position ids in every forward.
    ``recompute`` (activation checkpointing, e.g. ``mst.apply``) runs every layer's forward twice. Every forward
    of the model adds one all-gather of each rank's (batch, tokens) shape (two int64, ``check_equal_shards``).
    The loss adds two scalar all-reduces over the SP group (valid-label count, int64; loss, fp32) and the
    gradient reduction ``grad_buckets`` all-reduces of ``grad_bytes`` in all over the sp_size x dp_size grid.

    Raises ValueError unless every count and size is a positive integer (``grad_bytes``: non-negative) and
    ``seq_len`` splits evenly over ``sp_size``, as ``shard_batch`` requires.
    """
    for name, value in (("sp_size", sp_size), ("dp_size", dp_size), ("layers", layers), ("heads", heads), ("kv_heads", kv_heads),
                        ("head_dim", head_dim), ("batch", batch), ("seq_len", seq_len),
                        ("grad_buckets", grad_buckets), ("act_bytes", act_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(grad_bytes, bool) or not isinstance(grad_bytes, int) or grad_bytes < 0:
        raise ValueError(f"grad_bytes must be a non-negative integer, got {grad_bytes!r}")
    if seq_len % sp_size:
        raise ValueError(f"seq_len {seq_len} is not divisible by sp_size={sp_size}: shards must be equal")
    ops: dict[str, dict[str, float]] = {}

    def add(op: str, calls: int, payload_each: float, group: int) -> None:
        if calls and group > 1:
            row = ops.setdefault(op, {"calls": 0, "payload_bytes": 0, "wire_bytes": 0.0})
            row["calls"] += calls
            row["payload_bytes"] += calls * payload_each
            row["wire_bytes"] += calls * payload_each * wire_factor(op, group)

    tokens = batch * seq_len // sp_size
    forwards = layers * (2 if recompute else 1)
    if backend in ("lss", "allgather"):
        channels = 2 * kv_heads + (heads if backend == "allgather" else 0)
        payload = sp_size * tokens * channels * head_dim * act_bytes
        add("all_gather_into_tensor", forwards, payload, sp_size)
        add("reduce_scatter_tensor", layers, payload, sp_size)
    elif backend == "ulysses":
        kv = max(kv_heads, sp_size)
        per_forward = (2 * heads + 2 * kv) * tokens * head_dim * act_bytes  # Q + K + V + output
        add("all_to_all_single", 4 * forwards, per_forward / 4, sp_size)  # sizes differ per call; the sum is exact
        add("all_to_all_single", 4 * layers, per_forward / 4, sp_size)
        add("all_gather", forwards, sp_size * tokens * 8, sp_size)
    else:
        raise ValueError(f"unknown sequence-parallel backend {backend!r}")
    add("all_gather_into_tensor", 1, sp_size * 2 * 8, sp_size)  # the shard-shape check
    add("all_reduce", 1, 8, sp_size)
    add("all_reduce", 1, 4, sp_size)
    add("all_reduce", grad_buckets, grad_bytes / grad_buckets, sp_size * dp_size)
    return ops


def grad_buckets(model: torch.nn.Module, bucket_bytes: int = 1024 ** 2) -> int:
    """How many all-reduces ``reduce_gradients(model, bucket_bytes=...)`` issues (its bucketing, per dtype)."""
    from .loss import gradient_buckets

    # a parameter and its gradient have the same dtype and size, so the parameters bucket as the gradients will
    return sum(1 for _ in gradient_buckets([p for p in model.parameters() if p.requires_grad], bucket_bytes))
