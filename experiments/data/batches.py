"""Stateless, seeded micro-batch schedule: micro-batch number g is a pure function of (dataset, seed, g).

Why stateless: a run resumed from a checkpoint at step s asks for micro-batch ``s * accumulation_steps`` and gets exactly
what the uninterrupted run got, with no sampler or DataLoader state to save. Epoch e uses the permutation
``randperm(len(dataset), generator=seed + e)``; the schedule walks through it ``micro_batch`` items at a time and the
last incomplete micro-batch of an epoch is dropped (every micro-batch has the same size).
"""
from __future__ import annotations

from typing import Callable

import torch

Batch = dict[str, torch.Tensor]


def pad_collate(items: list[Batch], pad_id: int, ignore_index: int = -100) -> Batch:
    """Right-pad variable-length items to the longest: input_ids with ``pad_id``, labels with ``ignore_index``,
    plus an ``attention_mask``. Equal-length items (packed data) are simply stacked, with no mask."""
    lengths = {len(it["input_ids"]) for it in items}
    if len(lengths) == 1:
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}
    n = max(lengths)
    out = {"input_ids": torch.full((len(items), n), pad_id, dtype=torch.long),  # (B, S)
           "labels": torch.full((len(items), n), ignore_index, dtype=torch.long),
           "attention_mask": torch.zeros((len(items), n), dtype=torch.long)}
    for row, it in enumerate(items):
        k = len(it["input_ids"])
        out["input_ids"][row, :k] = it["input_ids"]
        out["labels"][row, :k] = it["labels"]
        out["attention_mask"][row, :k] = 1
    return out


class MicroBatches:
    """``mb(g)`` -> micro-batch number g (a dict of (micro_batch, S) tensors) of a map-style dataset."""

    def __init__(self, dataset, micro_batch: int, seed: int = 0,
                 collate: Callable[[list[Batch]], Batch] | None = None):
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        if len(dataset) < micro_batch:
            raise ValueError(f"dataset has {len(dataset)} items, fewer than one micro-batch of {micro_batch}")
        self.dataset, self.micro_batch, self.seed = dataset, micro_batch, seed
        self.collate = collate or (lambda items: pad_collate(items, pad_id=0))
        self.per_epoch = len(dataset) // micro_batch
        self._perm: tuple[int, torch.Tensor] | None = None

    def indices(self, g: int) -> list[int]:
        """Dataset indices of micro-batch ``g``."""
        if g < 0:
            raise ValueError(f"micro-batch number must be >= 0, got {g}")
        epoch, pos = divmod(g, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(len(self.dataset), generator=gen))
        start = pos * self.micro_batch
        return self._perm[1][start:start + self.micro_batch].tolist()

    def __call__(self, g: int) -> Batch:
        return self.collate([self.dataset[i] for i in self.indices(g)])
