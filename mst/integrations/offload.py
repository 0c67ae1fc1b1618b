"""Offload of activation-checkpoint inputs to CPU.

With per-layer checkpointing, what stays alive between forward and backward is each decoder layer's input
(S x d per layer). ``offloading_checkpoint`` wraps HF's checkpoint function so those saved inputs are packed to CPU
(pinned memory, copied on a side stream on CUDA via ``torch.autograd.graph.save_on_cpu``) and brought back when the
layer is recomputed. The checkpoint's own inner hooks take precedence inside the layer, so only the layer inputs
are offloaded, never the layer's internals. On CPU the same code path runs (the copy is a plain CPU copy).
"""
from __future__ import annotations

from typing import Callable

import torch


class OffloadingCheckpoint:
    """An HF ``_gradient_checkpointing_func`` whose saved tensors live on CPU until backward.

    A class, not a closure, so a model using it can be deep-copied and pickled like any other."""

    def __init__(self, checkpoint_fn: Callable):
        self.checkpoint_fn = checkpoint_fn

    def __call__(self, *args, **kwargs):
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return self.checkpoint_fn(*args, **kwargs)


def offloading_checkpoint(checkpoint_fn: Callable) -> OffloadingCheckpoint:
    """Wrap an HF ``_gradient_checkpointing_func`` so the tensors it saves live on CPU until backward."""
    return OffloadingCheckpoint(checkpoint_fn)
