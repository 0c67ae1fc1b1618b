"""Chunked LM-head + cross-entropy (MsT Algorithm 2 + 4), exact: the S x V logits never exist.

Forward computes, one mini-sequence of tokens at a time, logits = h W^T (+ b), upcasts to fp32 like HF's loss,
applies optional logit scaling and final-logit softcapping (Gemma-2/3), and accumulates the summed cross-entropy.
Only h, W and the labels are saved. Backward recomputes each chunk's logits and forms
dlogits = (softmax - onehot) * per-token weight, then dh = dlogits W and dW += dlogits^T h.

Fixes against the official code (paper.md §5.2): dW is *returned* to autograd only (no manual ``.grad`` writes, so
no 2x and no blow-up under gradient accumulation; tied embeddings just add up); chunks are a fixed size with a
remainder chunk (no dropped tail tokens, no loss 0 when S < M); the loss is normalised by the global count of valid
tokens (or HF's ``num_items_in_batch``); softcapping is applied.

Legend: N = tokens (batch x seq flattened), d = hidden, V = vocab, C = chunk tokens.
Memory: O(C x V) fp32 transient instead of O(N x V); plus a V x d fp32 gradient accumulator for bf16/fp16 weights.
Cost: the LM-head matmul runs twice (forward, and recompute in backward) plus the dW/dh matmuls of vanilla.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .mini_sequence_mlp import autocast_state

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def lm_head_chunk_tokens(n_tokens: int, vocab_size: int, hidden_size: int, *, chunk_tokens: int | None = None,
                         num_chunks: int | None = None, logits_budget_bytes: int | None = None) -> int:
    """Tokens per LM-head chunk. Default: M = ceil(V / d) chunks (the paper's rule: 32 for Llama3, 72 for Gemma-2)
    but never fewer than d / 4 tokens per chunk, so short sequences do not run 32-token chunks (11x slower than
    unchunked at S=1024 in the paper) while long ones, where memory matters, chunk exactly as the paper does
    (measured in experiments/table13_16: same max lengths; a d-token floor would cost Gemma-2-9B a third of its max length).

    Exactly one of ``chunk_tokens`` / ``num_chunks`` / ``logits_budget_bytes`` may be given; the byte budget bounds
    one chunk's fp32 logits (C x V x 4 bytes).
    """
    given = [v is not None for v in (chunk_tokens, num_chunks, logits_budget_bytes)]
    if sum(given) > 1:
        raise ValueError("give at most one of chunk_tokens, num_chunks, logits_budget_bytes")
    if chunk_tokens is not None:
        if chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens}")
        return int(chunk_tokens)
    if logits_budget_bytes is not None:
        if logits_budget_bytes < vocab_size * 4:
            raise ValueError(f"logits_budget_bytes={logits_budget_bytes} is below one token's fp32 logits "
                             f"({vocab_size * 4} bytes)")
        return int(logits_budget_bytes // (vocab_size * 4))
    if num_chunks is None:
        num_chunks = math.ceil(vocab_size / hidden_size)
        return max(1, math.ceil(n_tokens / num_chunks), math.ceil(hidden_size / 4))
    if num_chunks <= 0:
        raise ValueError(f"num_chunks must be a positive integer, got {num_chunks}")
    return max(1, math.ceil(n_tokens / num_chunks))


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, logit_scale: float | None,
                  softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits of one chunk, and tanh(z/cap) when softcapping (needed for its derivative)."""
    z = F.linear(h, weight, bias).float()
    if logit_scale is not None:
        z.mul_(logit_scale)
    if softcap is None:
        return z, None
    t = z.div_(softcap).tanh_()
    return t * softcap, t


class ChunkedLMHeadLossFunction(torch.autograd.Function):
    """Per-token (reduction="none") or summed cross-entropy of ``h W^T`` without materialising N x V logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens, ignore_index, logit_scale, softcap, per_token):
        ctx.chunk_tokens, ctx.ignore_index = chunk_tokens, ignore_index
        ctx.logit_scale, ctx.softcap, ctx.per_token = logit_scale, softcap, per_token
        ctx.autocast = autocast_state(hidden.device.type)
        ctx.save_for_backward(hidden, weight, bias, labels)
        losses = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk_tokens):
            y = labels[s:s + chunk_tokens]
            if bool((y == ignore_index).all()):
                continue
            z, _ = _chunk_logits(hidden[s:s + chunk_tokens], weight, bias, logit_scale, softcap)
            losses[s:s + chunk_tokens] = F.cross_entropy(z, y, ignore_index=ignore_index, reduction="none")
        return losses if per_token else losses.sum()

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, labels = ctx.saved_tensors
        want_h, want_w, want_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        valid = labels != ctx.ignore_index
        # per-token weight of d(loss)/d(logit): the upstream gradient, zero on ignored tokens
        tok_w = (grad_out if ctx.per_token else grad_out.expand(labels.shape[0])).float() * valid
        grad_h = torch.zeros_like(hidden) if want_h else None
        acc_dtype = torch.float32 if weight.dtype in _LOW_PRECISION else weight.dtype
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if want_b else None
        safe_labels = labels.clamp_min(0)
        for s in range(0, hidden.shape[0], ctx.chunk_tokens):
            e = s + ctx.chunk_tokens
            if not bool(valid[s:e].any()):
                continue
            h = hidden[s:e]
            with torch.autocast(**ctx.autocast):  # same logits precision as the forward
                z, t = _chunk_logits(h, weight, bias, ctx.logit_scale, ctx.softcap)
            dz = torch.softmax(z, dim=-1)
            del z
            rows = torch.arange(dz.shape[0], device=dz.device)
            dz[rows, safe_labels[s:e]] -= 1.0
            dz.mul_(tok_w[s:e, None])
            if t is not None:  # d(cap * tanh(z/cap))/dz = 1 - tanh^2
                dz.mul_(t.square_().neg_().add_(1.0))
                del t
            if ctx.logit_scale is not None:
                dz.mul_(ctx.logit_scale)
            dlogits = dz.to(weight.dtype)
            del dz
            if want_h:
                grad_h[s:e] = dlogits @ weight
            if want_w:
                grad_w.addmm_(dlogits.t().to(acc_dtype), h.to(acc_dtype))
            if want_b:
                grad_b.add_(dlogits.sum(0, dtype=acc_dtype))
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def chunked_lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: torch.Tensor | None = None, chunk_tokens: int | None = None,
                         num_chunks: int | None = None, logits_budget_bytes: int | None = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         num_items_in_batch: int | torch.Tensor | None = None, logit_scale: float | None = None,
                         final_logit_softcapping: float | None = None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` (already aligned, i.e. shifted), chunked.

    hidden: (..., d); labels: (...) with ``ignore_index`` for positions that do not count.
    reduction="mean": sum / ``num_items_in_batch`` if given, else sum / (number of valid labels) -- HF's
    ``ForCausalLMLoss`` semantics, including NaN when every label is ignored and no ``num_items_in_batch`` is given.
    reduction="sum": summed loss; reduction="none": per-token losses shaped like ``labels`` (0 where ignored).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not align")
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1).to(flat_h.device)
    n = flat_h.shape[0]
    chunk = lm_head_chunk_tokens(max(n, 1), weight.shape[0], weight.shape[1], chunk_tokens=chunk_tokens,
                                 num_chunks=num_chunks, logits_budget_bytes=logits_budget_bytes)
    out = ChunkedLMHeadLossFunction.apply(flat_h, weight, bias, flat_y, chunk, ignore_index, logit_scale,
                                          final_logit_softcapping, reduction == "none")
    if reduction == "none":
        return out.view(labels.shape)
    if reduction == "sum":
        return out
    if num_items_in_batch is not None:
        denom = num_items_in_batch.to(out.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        return out / denom
    return out / (flat_y != ignore_index).sum()
