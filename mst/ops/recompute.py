"""What a recompute in backward needs from its forward: the autocast settings, the RNG state, fp32 gradient sums.

The mini-sequence MLP and the module LM head keep no intermediates: backward runs each chunk's forward again and
asks autograd for that chunk's gradients. That is only the gradient of the output the forward returned if the
recompute computes the *same* output, and autograd runs backward outside the caller's context:

- ``autocast_state``: backward runs outside the caller's ``torch.autocast``, so a recompute would run in another
  precision (fp32 instead of bf16) than the forward; the forward records the settings and backward re-enters them.
- ``ChunkRNGStates``: a recompute that draws random numbers (``nn.Dropout``, a LoRA adapter's ``lora_dropout``)
  would draw fresh masks; the forward records the generator state in front of each chunk and backward replays it,
  as ``torch.utils.checkpoint`` does, leaving the caller's RNG stream as the forward left it. A chunk whose forward
  drew nothing keeps no state (the CPU generator's is 5 KB: one per chunk and layer would be a per-token cost).
- ``ParamGrads``: the chunks' parameter gradients are summed over M chunks; for bf16/fp16 parameters the sum is
  kept in fp32 (``accumulation_dtype``, also used by the LM head's gradient buffers), so it is not a sum of
  rounded partial sums.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import unset_fake_temporarily

def zero3_partitioned(params: Sequence[torch.Tensor]) -> bool:
    """True for DeepSpeed ZeRO-3 parameters (they carry ``ds_id``): partitioned outside their module's forward, and
    gathered by a collective at each call of their module."""
    return any(hasattr(p, "ds_id") for p in params)


def chunk_count_over_ranks(n_chunks: int, params: Sequence[torch.Tensor]) -> int:
    """``n_chunks``; under DeepSpeed ZeRO-3 with several ranks, the largest chunk count over the ranks. Each call of
    a ZeRO-3 module gathers its parameters with a collective, so every rank must make the same calls: a rank with
    fewer tokens (data parallelism over sequences of different lengths) runs empty chunks for the rest, which add
    nothing. One all-reduce of one integer per op call, only under ZeRO-3."""
    if not zero3_partitioned(params) or not (dist.is_available() and dist.is_initialized()) \
            or dist.get_world_size() == 1:
        return n_chunks
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    count = torch.tensor([n_chunks], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype gradients of ``dtype`` are summed in: fp32 for bf16/fp16, else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def autocast_state(device_type: str) -> dict[str, Any]:
    """The ambient autocast settings, as ``torch.autocast(**state)`` arguments to re-enter in backward."""
    return {"device_type": device_type, "enabled": torch.is_autocast_enabled(device_type),
            "dtype": torch.get_autocast_dtype(device_type), "cache_enabled": torch.is_autocast_cache_enabled()}


class ChunkRNGStates:
    """The random-generator state in front of each chunk's forward, replayed in front of that chunk's recompute.

    As torch.utils.checkpoint does: the CPU generator and, for an accelerator tensor, its device's generator; each
    replay runs inside ``fork_rng``, so the caller's stream after backward is the one the forward left. Kept as plain
    ctx attributes (not saved tensors).
    """

    def __init__(self, like: torch.Tensor):
        device_type = like.device.type
        self.devices = [] if device_type in ("cpu", "meta") else [like.get_device()]
        self.device_type = device_type if self.devices else "cpu"
        self.module = torch.get_device_module(device_type) if self.devices else None
        self.states: list[tuple[torch.Tensor, list[torch.Tensor]] | None] = []

    def _now(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The generators' states as real tensors, also inside a fake-tensor trace (the memory planner's), where
        comparing fake copies would be data-dependent."""
        with unset_fake_temporarily():
            return torch.get_rng_state(), [self.module.get_rng_state(d) for d in self.devices]

    def capture(self) -> None:
        """Record the state the next chunk's forward starts from."""
        self.states.append(self._now())

    def settle(self) -> None:
        """After that chunk's forward: drop its state if the forward drew no random numbers (most MLPs and heads),
        since its recompute then needs no replay."""
        (cpu, devices), (cpu_now, devices_now) = self.states[-1], self._now()
        with unset_fake_temporarily():
            unchanged = torch.equal(cpu, cpu_now) and all(torch.equal(a, b) for a, b in zip(devices, devices_now))
        if unchanged:
            self.states[-1] = None

    @contextlib.contextmanager
    def replay(self, chunk: int) -> Iterator[None]:
        """Run the block from the state captured before forward chunk number ``chunk``; restore the caller's after."""
        if self.states[chunk] is None:  # the forward drew nothing: neither does the recompute
            yield
            return
        cpu_state, device_states = self.states[chunk]
        with torch.random.fork_rng(devices=self.devices, device_type=self.device_type):
            torch.set_rng_state(cpu_state)
            for device, state in zip(self.devices, device_states):
                self.module.set_rng_state(state, device)
            yield


class ParamGrads:
    """Per-chunk gradients of the ``params`` that need one, summed over chunks.

    fp32 accumulators for low-precision params: the M chunk gradients are summed without further rounding (each
    chunk's gradient is still rounded once to the param dtype by autograd; measured bf16 weight-grad error is within
    ~5% of vanilla's, tests/integrations/test_hf_bf16.py).
    """

    def __init__(self, params: Sequence[torch.Tensor], needs: Sequence[bool]):
        self.params, self.needs = params, needs
        self.wanted = [p for p, need in zip(params, needs) if need]
        self.accs: list[torch.Tensor | None] = [None] * len(self.wanted)

    def add(self, grads: Sequence[torch.Tensor | None]) -> None:
        """Add one chunk's gradients of ``self.wanted`` (None where the chunk did not use a param)."""
        for i, g in enumerate(grads):
            if g is None:
                continue
            if self.accs[i] is None:
                self.accs[i] = g.to(accumulation_dtype(g.dtype))
            else:
                self.accs[i].add_(g)

    def result(self, zeros_if_unused: bool = False) -> list[torch.Tensor | None]:
        """One entry per param, in its dtype: None where not needed, or where unused unless ``zeros_if_unused``."""
        it = iter(self.accs)
        out = []
        for p, need in zip(self.params, self.needs):
            g = next(it) if need else None
            if g is None and need and zeros_if_unused:
                g = torch.zeros_like(p)
            out.append(g.to(p.dtype) if g is not None else None)
        return out
