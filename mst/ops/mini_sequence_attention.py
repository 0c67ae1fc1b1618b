"""Mini-sequence attention: exact (causal) attention computed by chunks of queries, forward and backward.

Attention is the one op of a decoder layer that is not token-wise, but its *queries* are: query chunk [s, e) needs
only the keys and values of its own causal prefix (and of its sliding window). So, as the mini-sequence MLP does
for tokens, the forward runs one query chunk at a time under ``no_grad`` and saves only Q, K, V (and the mask, if
any); backward recomputes one chunk at a time and asks autograd for that chunk's dQ and its prefix's dK, dV, which
are summed into fp32 buffers at the K/V heads' width. What exists at full sequence length is therefore Q, K, V, the
output and dQ (in the input dtype) and dK, dV (fp32, KV heads): no S x S scores, no GQA-expanded K/V, no
full-sequence fp32 dQ accumulator (flash-attention's backward keeps one), no per-chunk state beyond one chunk's.

Two ways to compute one chunk (``backend``):
- "math": HF's eager attention (matmul, scale, optional tanh softcap, mask, softmax, matmul), all in fp32 at least
  (as SDPA's kernels, more precise than eager's bf16 scores), with the query heads of a KV head folded into the rows
  so K/V are never repeated; scores are (batch x heads x chunk x prefix) fp32, so keep chunks small. The CPU path,
  and the one with softcap.
- "sdpa": ``torch.nn.functional.scaled_dot_product_attention`` per chunk with a lower-right causal bias (the flash
  kernel on CUDA, no mask built; on CPU SDPA materialises it as a C x L boolean mask for its flash kernel) and
  ``enable_gqa`` (K/V not repeated); a window or a mask is passed as a boolean mask of the chunk. No softcap.
"auto" takes "sdpa", or "math" for a softcap. On CPU "sdpa" is also the faster: a checkpointed layer's attention
takes 1.4x SDPA's time at 4K tokens (1.7x at 16K) against 3.7x for "math" (experiments/table6/README.md).

Legend: B batch, H query heads, Hkv key/value heads, S query tokens, Sk key tokens (Sk >= S: the queries are the last
S positions, as in decoding with a cache), C chunk tokens, L = the keys a chunk sees (<= Sk).
Cost: backward runs each chunk's forward again (one more attention forward per step, as the MLP's recompute).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch.autograd.function import FunctionCtx
from torch.nn.attention.bias import causal_lower_right

from .lm_head_common import MAX_CHUNK_ELEMENTS
from .recompute import accumulation_dtype, autocast_state

ATTENTION_BACKENDS = ("auto", "math", "sdpa")
SDPA_CHUNK_TOKENS = 8192  # the "sdpa" backend's default chunk on CUDA: a flash kernel's memory is O(C), not O(C x L)
_TRACED_AS_CUDA: contextvars.ContextVar[bool] = contextvars.ContextVar("traced_as_cuda", default=False)


@dataclass(frozen=True)
class AttentionSpec:
    """What one attention call computes, besides its tensors. ``window``: a query at position p sees keys in
    (p - window, p] (HF's ``sliding_window``); ``softcap``: scores -> softcap * tanh(scores / softcap)."""

    scale: float
    causal: bool = True
    window: int | None = None
    softcap: float | None = None
    chunk_tokens: int = 1
    backend: str = "math"


def default_attention_chunk_tokens(batch: int, heads: int, head_dim: int, key_tokens: int, backend: str,
                                   cuda: bool) -> int:
    """Query tokens per chunk, at least 1 and so that no tensor of the op passes ``MAX_CHUNK_ELEMENTS`` (int32-indexed
    kernels fail past it; at Llama3-8B's 32 heads and 1M keys that caps a math chunk at 63 queries).
    "sdpa" on CUDA: ``SDPA_CHUNK_TOKENS`` (the flash kernel with a lower-right causal bias builds no mask: O(C)
    memory). "sdpa" elsewhere: H x D queries, since SDPA then materialises the chunk's (C x L) boolean mask, which is
    thus no larger than Q at the key length. "math": D queries, so one chunk's fp32 scores (B x H x C x Sk) are as
    many elements as Q at the key length (the MLP's rule: a chunk's intermediate no larger than an input)."""
    if backend == "sdpa":
        if cuda:
            return SDPA_CHUNK_TOKENS
        return max(1, min(heads * head_dim, MAX_CHUNK_ELEMENTS // max(1, key_tokens)))
    return max(1, min(head_dim, MAX_CHUNK_ELEMENTS // max(1, batch * heads * key_tokens)))


@contextlib.contextmanager
def traced_as_cuda() -> Iterator[None]:
    """Inside, fake tensors (the memory planner's trace) are attended as CUDA would: the CUDA default chunk, and a
    lower-right causal chunk as plain causal SDPA, which has the same outputs, lse and buffers as CUDA's flash kernel
    with the lower-right bias (fake tensors have no values) and which the fake CPU dispatch sends to its flash
    kernel too (a CausalBias on CPU would build a C x L mask that CUDA never does)."""
    token = _TRACED_AS_CUDA.set(True)
    try:
        yield
    finally:
        _TRACED_AS_CUDA.reset(token)


def _key_range(spec: AttentionSpec, offset: int, start: int, end: int, key_tokens: int) -> tuple[int, int]:
    """The keys [lo, hi) that queries [start, end) (absolute positions offset + start ...) can see."""
    hi = min(key_tokens, offset + end) if spec.causal else key_tokens
    lo = max(0, offset + start - spec.window + 1) if spec.window is not None else 0
    return lo, max(lo, hi)


def _allowed(spec: AttentionSpec, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
    """(1, 1, C, L) boolean: which keys each query of the chunk may see by position (None: all)."""
    allowed = None
    if spec.causal:
        allowed = k_pos[None, :] <= q_pos[:, None]
    if spec.window is not None:
        inside = k_pos[None, :] > q_pos[:, None] - spec.window
        allowed = inside if allowed is None else allowed & inside
    return None if allowed is None else allowed[None, None]


def _attend_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None,
                 bias: torch.Tensor | None, spec: AttentionSpec) -> torch.Tensor:
    """One chunk: HF's eager attention in fp32 at least, the query heads of each KV head folded into rows (no
    repeated K/V).

    q (B, H, C, D); k, v (B, Hkv, L, D); ``keep`` boolean and ``bias`` additive, each broadcastable to
    (B, H, C, L) or None. A query row that may see no key gets zeros (as SDPA's safe softmax)."""
    b, h, c, d = q.shape
    hkv, n_keys = k.shape[1], k.shape[2]
    groups = h // hkv
    exact = torch.promote_types(q.dtype, torch.float32)  # scores, softmax and P @ V in fp32 at least, as SDPA
    scores = torch.matmul(q.reshape(b, hkv, groups * c, d).to(exact), k.transpose(-1, -2).to(exact))
    scores = scores.view(b, hkv, groups, c, n_keys) * spec.scale
    if spec.softcap is not None:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    if bias is not None:
        scores = scores + _grouped(bias, hkv, groups)
    if keep is not None:
        keep = _grouped(keep, hkv, groups)
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if keep is not None:
        probs = probs.masked_fill(~keep.any(dim=-1, keepdim=True), 0.0)
    out = torch.matmul(probs.view(b, hkv, groups * c, n_keys), v.to(exact))
    return out.view(b, h, c, v.shape[-1]).to(v.dtype)


def _grouped(mask: torch.Tensor, hkv: int, groups: int) -> torch.Tensor:
    """A (B|1, H|1, C, L) mask as (B|1, Hkv|1, groups|1, C, L), to broadcast against grouped scores."""
    if mask.shape[1] == 1:
        return mask.unsqueeze(2)
    return mask.unflatten(1, (hkv, groups))


def _attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None,
                 bias: torch.Tensor | None, spec: AttentionSpec, lower_right: bool) -> torch.Tensor:
    """One chunk through SDPA; ``lower_right``: plain causal chunk (flash kernel with a lower-right causal bias)."""
    gqa = q.shape[1] != k.shape[1]
    if lower_right and isinstance(q, FakeTensor) and _TRACED_AS_CUDA.get():  # see ``traced_as_cuda``
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=spec.scale, enable_gqa=gqa)
    if lower_right and q.is_cuda:  # flash / memory-efficient kernels apply it without building it
        mask = causal_lower_right(q.shape[2], k.shape[2])
    elif lower_right:  # what SDPA would materialise from a CausalBias on CPU (which fails under dispatch modes)
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - q.shape[2])
    elif bias is not None:
        mask = bias if keep is None else bias.masked_fill(~keep, float("-inf"))
    else:
        mask = keep
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=spec.scale, enable_gqa=gqa)


class _Chunk:
    """One query chunk: its slices of Q, K, V (views) and how to attend them. Its masks are built inside ``attend``,
    so only the running chunk's exist."""

    def __init__(self, spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 mask: torch.Tensor | None, start: int, end: int):
        self.spec, self.mask, self.offset = spec, mask, k.shape[2] - q.shape[2]
        self.start, self.end = start, end
        self.lo, self.hi = _key_range(spec, self.offset, start, end, k.shape[2])
        self.q = q[:, :, start:end]
        self.k, self.v = k[:, :, self.lo:self.hi], v[:, :, self.lo:self.hi]

    def _masks(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(keep, bias): the boolean mask from positions and the caller's mask, and the caller's additive one."""
        q_pos = torch.arange(self.offset + self.start, self.offset + self.end, device=device)
        keep = _allowed(self.spec, q_pos, torch.arange(self.lo, self.hi, device=device))
        if self.mask is None:
            return keep, None
        rows = slice(self.start, self.end) if self.mask.shape[-2] != 1 else slice(None)
        part = self.mask[..., rows, self.lo:self.hi]
        if part.dtype != torch.bool:
            return keep, part
        return (part if keep is None else part & keep), None

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        lower_right = self.mask is None and self.spec.causal and self.spec.window is None
        if self.spec.backend == "sdpa" and lower_right:
            return _attend_sdpa(q, k, v, None, None, self.spec, lower_right=True)
        keep, bias = self._masks(q.device)
        if self.spec.backend == "sdpa":
            return _attend_sdpa(q, k, v, keep, bias, self.spec, lower_right=False)
        return _attend_math(q, k, v, keep, bias, self.spec)


def _chunks(spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            mask: torch.Tensor | None) -> Iterator[_Chunk]:
    n = q.shape[2]
    for start in range(0, n, spec.chunk_tokens):
        yield _Chunk(spec, q, k, v, mask, start, min(n, start + spec.chunk_tokens))


class MiniSequenceAttentionFunction(torch.autograd.Function):
    """softmax(Q K^T * scale [+ mask]) V by query chunks; saves Q, K, V (and the mask), recomputes in backward."""

    @staticmethod
    def forward(ctx: FunctionCtx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                spec: AttentionSpec) -> torch.Tensor:
        """Each chunk under no_grad; the output is written chunk by chunk into one (B, H, S, Dv) tensor."""
        ctx.save_for_backward(q, k, v, mask)
        ctx.spec, ctx.autocast = spec, autocast_state(q.device.type)
        out = None
        with torch.no_grad():
            for chunk in _chunks(spec, q, k, v, mask):
                part = chunk.attend(chunk.q, chunk.k, chunk.v)
                if out is None:
                    out = part.new_empty(*q.shape[:3], part.shape[-1])
                out[:, :, chunk.start:chunk.end] = part
        return out

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Per chunk: recompute under the forward's autocast, autograd gives dQ of the chunk and dK, dV of its
        keys; dK, dV are summed in fp32 at the KV heads' width."""
        q, k, v, mask = ctx.saved_tensors
        want_q, want_k, want_v = ctx.needs_input_grad[:3]
        grad_q = torch.zeros_like(q) if want_q else None
        grad_k = torch.zeros(k.shape, dtype=accumulation_dtype(k.dtype), device=k.device) if want_k else None
        grad_v = torch.zeros(v.shape, dtype=accumulation_dtype(v.dtype), device=v.device) if want_v else None
        for chunk in _chunks(ctx.spec, q, k, v, mask):
            if chunk.hi == chunk.lo:  # no key to see: the output was zeros
                continue
            inputs = (chunk.q.detach().requires_grad_(want_q), chunk.k.detach().requires_grad_(want_k),
                      chunk.v.detach().requires_grad_(want_v))
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                out = chunk.attend(*inputs)
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out[:, :, chunk.start:chunk.end]))
            if want_q:
                grad_q[:, :, chunk.start:chunk.end] = next(grads)
            if want_k:
                grad_k[:, :, chunk.lo:chunk.hi] += next(grads)
            if want_v:
                grad_v[:, :, chunk.lo:chunk.hi] += next(grads)
        return (grad_q, grad_k.to(k.dtype) if want_k else None, grad_v.to(v.dtype) if want_v else None, None, None)


def mini_sequence_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
                            scale: float | None = None, causal: bool = True, window: int | None = None,
                            softcap: float | None = None, chunk_tokens: int | None = None,
                            backend: str = "auto") -> torch.Tensor:
    """Attention of ``q`` (B, H, S, D) over ``k``, ``v`` (B, Hkv, Sk, D), H a multiple of Hkv, by query chunks.

    ``mask``: None, boolean (True = may attend) or additive float, broadcastable to (B, H, S, Sk) with its last two
    dims (S or 1, Sk); ``causal`` aligns queries to the last S keys (lower right). ``scale`` defaults to D^-0.5.
    Returns (B, H, S, Dv), equal to the unchunked attention (HF eager / SDPA) to rounding; no split when S fits one
    chunk. Raises ValueError on shapes or options it cannot compute exactly.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"mini_sequence_attention: backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0]:
        raise ValueError(f"mini_sequence_attention: expected q (B, H, S, D) and k, v (B, Hkv, Sk, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"mini_sequence_attention: {q.shape[1]} query heads of width {q.shape[-1]} do not group "
                         f"over {k.shape[1]} key heads of width {k.shape[-1]}")
    if causal and k.shape[2] < q.shape[2]:
        raise ValueError(f"mini_sequence_attention: causal attention of {q.shape[2]} queries over fewer keys "
                         f"({k.shape[2]})")
    if window is not None and window < 1:
        raise ValueError(f"mini_sequence_attention: window must be a positive integer, got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"mini_sequence_attention: softcap must be positive, got {softcap!r}")
    if mask is not None and (mask.dim() != 4 or mask.shape[-1] != k.shape[2] or mask.shape[-2] not in (1, q.shape[2])
                             or mask.shape[1] not in (1, q.shape[1]) or mask.shape[0] not in (1, q.shape[0])):
        raise ValueError(f"mini_sequence_attention: mask of shape {tuple(mask.shape)} does not broadcast to "
                         f"{(q.shape[0], q.shape[1], q.shape[2], k.shape[2])}")
    if backend == "auto":
        backend = "math" if softcap is not None else "sdpa"
    if backend == "sdpa" and softcap is not None:
        raise ValueError("mini_sequence_attention: the sdpa backend has no softcap; use backend='math'")
    if chunk_tokens is None:
        chunk_tokens = default_attention_chunk_tokens(q.shape[0], q.shape[1], q.shape[-1], k.shape[2], backend,
                                                      cuda=q.is_cuda or _TRACED_AS_CUDA.get())
    if chunk_tokens <= 0:
        raise ValueError(f"mini_sequence_attention: chunk_tokens must be a positive integer, got {chunk_tokens}")
    spec = AttentionSpec(scale=q.shape[-1] ** -0.5 if scale is None else float(scale), causal=causal, window=window,
                         softcap=softcap, chunk_tokens=min(chunk_tokens, max(1, q.shape[2])), backend=backend)
    if q.shape[2] == 0:
        return q.new_empty(*q.shape[:3], v.shape[-1])
    return MiniSequenceAttentionFunction.apply(q, k, v, mask, spec)

