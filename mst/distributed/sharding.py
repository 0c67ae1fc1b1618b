"""Split one batch along the sequence for sequence parallelism, so that the sharded run is exact.

Three things make the sharded forward equal the unsharded one:
1. labels are shifted *before* sharding (``shift_labels[:, t] = labels[:, t + 1]``, last position ignored), so the
   label of a shard's last token, which lives on the next rank, is not lost;
2. ``position_ids`` are global (rank r's shard carries positions r*S/sp ... (r+1)*S/sp - 1): rotary embeddings see
   the true positions, and Ulysses gathers them to rebuild the full causal order;
3. no attention mask: Ulysses drops masks (causality comes from positions), so a padding mask or packed sequences
   (position ids restarting inside a row) cannot be honoured and are rejected.

Lengths not divisible by sp: an error by default; ``pad=True`` appends tokens at the end of every row with label
``ignore_index`` and continuing positions. Under causal attention no real token attends to a later one, and
ignored labels add nothing to the loss or its count, so padding leaves loss and gradients unchanged.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F


def _check_positions(position_ids: torch.Tensor, batch: int, seq: int) -> None:
    expected = torch.arange(seq, device=position_ids.device).expand(batch, seq)
    if position_ids.shape != (batch, seq) and position_ids.shape != (1, seq):
        raise ValueError(f"position_ids {tuple(position_ids.shape)} does not match input_ids ({batch}, {seq})")
    if not torch.equal(position_ids.expand(batch, seq), expected):
        raise ValueError("sequence parallelism supports position_ids = arange(seq_len) per row only (packed "
                         "sequences need a varlen attention mask, which Ulysses does not carry)")


def shard_batch(batch: Mapping[str, torch.Tensor], rank: int, sp_size: int, *, pad: bool = False,
                pad_token_id: int = 0, ignore_index: int = -100) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s slice of ``batch`` for an SP group of ``sp_size`` ranks.

    batch: ``input_ids`` (B, S) and ``labels`` (B, S, unshifted, HF convention) or ``shift_labels`` (B, S,
    already shifted); optional ``position_ids`` (must be arange(S)) and ``attention_mask`` (must be all ones).
    Returns ``input_ids``, ``position_ids`` (global) and ``shift_labels``, each (B, S'/sp_size) where S' is S, or S
    rounded up to a multiple of ``sp_size`` when ``pad=True``. Pass the result to ``mst.distributed.sp_loss``.
    """
    if any(isinstance(v, bool) or not isinstance(v, int) for v in (rank, sp_size)) or sp_size < 1 or not 0 <= rank < sp_size:
        raise ValueError(f"need 0 <= rank < sp_size with integers, got rank={rank!r}, sp_size={sp_size!r}")
    unknown = set(batch) - {"input_ids", "labels", "shift_labels", "position_ids", "attention_mask"}
    if unknown:
        raise ValueError(f"shard_batch: unsupported batch keys {sorted(unknown)}")
    ids = batch.get("input_ids")
    if ids is None or ids.dim() != 2:
        raise ValueError("shard_batch needs input_ids of shape (batch, seq)")
    b, s = ids.shape
    if ("labels" in batch) == ("shift_labels" in batch):
        raise ValueError("shard_batch needs exactly one of labels (unshifted) or shift_labels (already shifted)")
    if "labels" in batch:
        labels = batch["labels"]
        if labels.shape != ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} does not match input_ids {tuple(ids.shape)}")
        shift = F.pad(labels, (0, 1), value=ignore_index)[:, 1:]  # tokens < n predict n (HF ForCausalLMLoss)
    else:
        shift = batch["shift_labels"]
        if shift.shape != ids.shape:
            raise ValueError(f"shift_labels {tuple(shift.shape)} does not match input_ids {tuple(ids.shape)}")
    mask = batch.get("attention_mask")
    if mask is not None and not bool((mask == 1).all()):
        raise ValueError("sequence parallelism does not support padding attention masks (Ulysses drops masks); "
                         "pack rows without padding, or use pad=True, which pads at the end with ignored labels")
    if batch.get("position_ids") is not None:
        _check_positions(batch["position_ids"], b, s)

    padded = -(-s // sp_size) * sp_size
    if padded != s and not pad:
        raise ValueError(f"sequence length {s} is not divisible by the SP size {sp_size}; trim or pad the batch, or "
                         f"call shard_batch(..., pad=True) to pad to {padded} with ignored labels")
    extra = padded - s
    full = {
        "input_ids": F.pad(ids, (0, extra), value=pad_token_id),
        "position_ids": torch.arange(padded, device=ids.device).expand(b, padded),
        "shift_labels": F.pad(shift, (0, extra), value=ignore_index),
    }
    local = padded // sp_size
    return {k: v[:, rank * local:(rank + 1) * local].contiguous() for k, v in full.items()}
