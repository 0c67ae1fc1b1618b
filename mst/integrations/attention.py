"""``mst.apply(attention=True)``: every decoder layer's core attention through ``mst.ops.mini_sequence_attention``.

HF looks the core attention up by the model's implementation name on every call (``ALL_ATTENTION_FUNCTIONS``) and
builds the mask for that name (``ALL_MASK_ATTENTION_FUNCTIONS``), so the option registers one more name,
``MINI_SEQUENCE_ATTENTION``, with ``attention_forward`` as its function and SDPA's mask function, and sets the
model's implementation to it (``revert`` puts the previous one back). No family forward is copied: projections,
q/k norms, rotary embeddings, caches and masks stay HF's. With SDPA's masks, a plain causal batch has no mask (the op
applies causality by position, never building S x S), while padding or packed sequences get HF's boolean mask,
which the op slices per query chunk. The name lives in the config, so copies and pickles of a patched model keep it
(importing mst registers it).

Sequence parallelism wraps the model's implementation at setup time, so this option is set before
``mst.distributed.setup_sequence_parallel`` (``apply`` refuses to change it on a sequence-parallel model); Ulysses
then runs this attention on the gathered sequence, LSS on its segment.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..ops import mini_sequence_attention

MINI_SEQUENCE_ATTENTION = "mst_mini_sequence"  # HF attention implementation name of ``attention_forward``
CHUNK_ATTR = "mst_attention_chunk_tokens"  # set on each attention module by ``apply`` (None: the op's default)
BACKEND_ATTR = "mst_attention_backend"  # likewise, the op's backend ("auto" when unset)
# keyword arguments of HF attention calls that change what attention computes and that the op does not implement
UNSUPPORTED = ("s_aux", "sinks", "position_bias", "cache")


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None, is_causal: bool | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """HF's attention-function signature: (B, H, S, D) query, (B, Hkv, Sk, D) key / value, SDPA's mask (None for a
    plain causal batch, else boolean, True = attend); returns ((B, S, H, D), None) like HF's SDPA function.

    With a mask (padding, packed sequences, a multimodal model's bidirectional image blocks, a cache), the mask
    alone decides which keys each query sees: every chunk then scans all keys. Without one, causality and the
    sliding window come from positions (queries are the last S of the Sk keys), so a chunk skips the keys after it."""
    if dropout:
        raise ValueError(f"mst mini-sequence attention has no attention dropout (got p={dropout}); set the config's "
                         "attention_dropout to 0 or apply mst without attention=True")
    used = [name for name in UNSUPPORTED if kwargs.get(name) is not None]
    if used:
        raise ValueError(f"mst mini-sequence attention does not implement {used} (attention sinks, position bias "
                         "or a paged cache); apply mst without attention=True for this model")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    positional = attention_mask is None
    out = mini_sequence_attention(query, key, value, mask=attention_mask, scale=scaling,
                                  causal=bool(causal) and positional, window=sliding_window if positional else None,
                                  softcap=softcap, chunk_tokens=getattr(module, CHUNK_ATTR, None),
                                  backend=getattr(module, BACKEND_ATTR, "auto"))
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register ``MINI_SEQUENCE_ATTENTION`` in HF's attention and mask registries (idempotent); returns it."""
    AttentionInterface.register(MINI_SEQUENCE_ATTENTION, attention_forward)
    AttentionMaskInterface.register(MINI_SEQUENCE_ATTENTION, sdpa_mask)
    return MINI_SEQUENCE_ATTENTION


register()
