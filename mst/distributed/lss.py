"""LSS Transformer attention (Wang et al., arXiv 2311.02382) for HF models, plus the naive all-gather baseline.

LSS ("Long Short-Sequence"): each rank keeps a contiguous segment of S/P tokens end to end; only attention needs
other segments. Rank r computes the *partial* self-attention of its own queries against the keys and values of
segments 0..r, which it gets from one fused collective:

    forward   kv = cat([K_r; V_r])  --all_gather_single------>  [K_0..K_{P-1}; V_0..V_{P-1}]   (1 collective)
              O_r = softmax(Q_r K_{0..r}^T + causal mask offset by r*S/P) V_{0..r}              (local, exact)
    backward  d[K;V] of every segment  --reduce_scatter_single-->  each rank's own d[K_r; V_r]     (1 collective)

No partial outputs are aggregated: O_r is complete (softmax over all keys it may see), so the output projection,
MLP (MsT's mini-sequence MLP) and LM-head run on the local segment. Parameters are replicated, so each rank's
weight gradient is partial; "double gradient averaging" (``mst.distributed.loss``) averages them over the whole
sequence x data grid in one all-reduce. Unlike Ulysses, LSS puts no constraint on head counts; its cost is that
every rank receives the K/V of the whole sequence: (P-1) * S/P * 2 * kv_heads * head_dim elements per layer,
which grows with P at fixed S/P, and rank P-1 attends to P times more keys than rank 0 (causal imbalance).

What follows the paper: segment-per-rank partial self-attention, a single fused collective for what attention
needs, no aggregation of partial attention, double gradient averaging over SP x DP, SP x DP grid. Our design
choices (the paper's code is not public): the fused collective is a tensor all-gather of the concatenated [K; V] after
rotary (so GQA's fewer kv heads shrink it), only segments 0..r are used (causality), the mask is the lower-right
causal one (rank 0 runs plain causal SDPA; ``_lower_right_causal_attention``), the backward is one reduce-scatter,
and attention is PyTorch SDPA whatever ``attn_implementation`` the model was built with, except on a model patched
with ``mst.apply(attention=True)``: there the segment's queries run by chunks (``mini_sequence_attention``, the same
lower-right causal attention, exact).

``gather_queries=True`` is the naive baseline (backend "allgather", Megatron-style sequence parallelism without
tensor parallelism): one all-gather of the full [Q; K; V] activations, full causal attention over the whole
sequence for all heads on every rank, the local rows kept; backward one reduce-scatter. Exact but P-fold redundant.

Both need equal contiguous segments in rank order with global positions (``mst.distributed.shard_batch``);
masks are dropped as in Ulysses. Softcapping and sliding-window attention are rejected (``validate``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..integrations.attention import CHUNK_ATTR, MINI_SEQUENCE_ATTENTION
from ..ops import mini_sequence_attention
from .routing import route


def validate(config: Any, sp_size: int) -> None:
    """Raise ``ValueError`` for attention variants this SDPA path would silently change (any head count is fine)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(cfg, "attn_logit_softcapping", None):
        raise ValueError(f"LSS sequence parallelism does not support attention logit softcapping "
                         f"(attn_logit_softcapping={cfg.attn_logit_softcapping}); use backend='ulysses'")
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and window < getattr(cfg, "max_position_embeddings", 0):
        raise ValueError(f"LSS sequence parallelism does not support sliding-window attention "
                         f"(sliding_window={window}); use backend='ulysses'")


def _op(name: str, before_torch_2_13: str):
    """A ``torch.distributed`` collective looked up at call time (so ``count_collectives`` sees it), by its
    current name or the one torch < 2.13 uses."""
    return getattr(dist, name, None) or getattr(dist, before_torch_2_13)


class _GatherSegments(torch.autograd.Function):
    """All-gather of each rank's (B, C, S_local, D) tensor into (P, B, C, S_local, D); backward reduce-scatters."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        out = local.new_empty((size * local.shape[0], *local.shape[1:]))  # segments concatenated along dim 0
        _op("all_gather_single", "all_gather_into_tensor")(out, local.contiguous(), group=group)
        return out.view(size, *local.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty(grad.shape[1:])
        _op("reduce_scatter_single", "reduce_scatter_tensor")(out, grad.contiguous().flatten(0, 1), group=ctx.group)
        return out, None


def _concat_segments(gathered: torch.Tensor) -> torch.Tensor:
    """(n, B, C, S_local, D) segments in rank order -> (B, C, n * S_local, D)."""
    n, b, c, s, d = gathered.shape
    return gathered.permute(1, 2, 0, 3, 4).reshape(b, c, n * s, d)


class SegmentAttention:
    """Attention of this rank's segment (LSS), or of the whole gathered sequence (``gather_queries``, baseline)."""

    def __init__(self, group: Any, gather_queries: bool = False) -> None:
        self.group = group
        self.gather_queries = gather_queries

    def __call__(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, *args, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs):
        rank = dist.get_rank(self.group)
        heads, kv_heads, local = query.shape[1], key.shape[1], query.shape[2]
        sdpa = dict(dropout_p=dropout, scale=scaling, enable_gqa=kv_heads != heads)
        if self.gather_queries:
            qkv = _concat_segments(_GatherSegments.apply(torch.cat([query, key, value], 1), self.group))
            q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **sdpa)
            out = out[:, :, rank * local:(rank + 1) * local]
        else:
            # segments after r are gathered (one collective for all ranks) but never attended to: not used
            kv = _concat_segments(_GatherSegments.apply(torch.cat([key, value], 1), self.group)[: rank + 1])
            k, v = kv.split([kv_heads, kv_heads], dim=1)
            if _mini_sequence(module):  # mst.apply(attention=True): the segment's queries by chunks, exact
                if dropout:
                    raise ValueError(f"mst mini-sequence attention has no attention dropout (got p={dropout})")
                out = mini_sequence_attention(query, k, v, scale=scaling,
                                              chunk_tokens=getattr(module, CHUNK_ATTR, None))
            else:
                out = (F.scaled_dot_product_attention(query, k, v, is_causal=True, **sdpa) if rank == 0
                       else _lower_right_causal_attention(query, k, v, **sdpa))
        return out.transpose(1, 2).contiguous(), None


def _mini_sequence(module: nn.Module) -> bool:
    """True for an attention module of a model patched with ``mst.apply(attention=True)``."""
    return getattr(getattr(module, "config", None), "_attn_implementation", None) == MINI_SEQUENCE_ATTENTION


def _lower_right_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                                  enable_gqa: bool, **sdpa) -> torch.Tensor:
    """Causal attention of the last ``query.shape[2]`` positions against all keys: query i (global r*S_local + i)
    sees keys 0 .. r*S_local + i.

    On CUDA, ``causal_lower_right`` lets SDPA's flash / memory-efficient kernels apply the mask without
    materialising it (kv heads expanded first: those kernels take equal head counts). Written, not yet run on a GPU.
    On CPU SDPA materialises any mask, so an explicit S_local x S boolean one is passed (it is what the peak-memory
    measurements here include).
    """
    local, keys = query.shape[2], key.shape[2]
    if query.is_cuda:
        from torch.nn.attention.bias import causal_lower_right

        if enable_gqa:
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=causal_lower_right(local, keys), **sdpa)
    mask = torch.ones(local, keys, dtype=torch.bool, device=query.device).tril(keys - local)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=enable_gqa, **sdpa)


def _install(model: nn.Module, group: Any, gather_queries: bool) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = model.config._attn_implementation
    if impl not in ALL_ATTENTION_FUNCTIONS:  # "eager" is called directly by HF, not looked up: no hook point
        raise ValueError(f"LSS sequence parallelism hooks the attention registry, which has no {impl!r} entry; "
                         f"build the model with attn_implementation='sdpa' (LSS runs SDPA itself either way)")
    attention = SegmentAttention(group, gather_queries)
    route(model, lambda core_attention: attention)  # LSS runs SDPA itself, never the core function


def install(model: nn.Module, group: Any) -> None:
    """Route every attention module of ``model`` through LSS segment attention over ``group``."""
    _install(model, group, gather_queries=False)


def install_allgather(model: nn.Module, group: Any) -> None:
    """Route every attention module of ``model`` through the naive all-gather baseline over ``group``."""
    _install(model, group, gather_queries=True)
