"""Chunked LM-head + cross-entropy (MsT Algorithm 2 + 4), exact: the S x V logits never exist.

Forward computes, one mini-sequence of tokens at a time, logits = h W^T (+ b), upcasts to fp32 like HF's loss,
applies optional logit scaling and final-logit softcapping (Gemma-2/3), and accumulates the summed cross-entropy.
For a summed / mean loss that needs gradients, the same loop also forms each chunk's gradient while its logits
exist -- dlogits = (softmax - onehot) * per-token weight, dh = dlogits W, dW += dlogits^T h -- so the logits matmul
runs once, as in vanilla (Liger and Apple's CCE do the same); backward only multiplies by the upstream scalar.
Per-token losses (reduction="none", upstream gradient per token) save h, W and the labels and recompute each
chunk's logits in backward instead.

Fixes against the official code (paper.md §5.2): dW is *returned* to autograd only (no manual ``.grad`` writes, so
no 2x and no blow-up under gradient accumulation; tied embeddings just add up); chunks are a fixed size with a
remainder chunk (no dropped tail tokens, no loss 0 when S < M); the loss is normalised by the global count of valid
tokens (or HF's ``num_items_in_batch``); softcapping is applied.

Legend: N = tokens (batch x seq flattened), d = hidden, V = vocab, C = chunk tokens.
Memory: O(C x V) fp32 transient instead of O(N x V); plus a V x d fp32 gradient accumulator for bf16/fp16 weights,
held from the forward to the backward of the loss (nothing else runs in between in a training step).
Cost: vanilla's three LM-head matmuls (logits, dh, dW); reduction="none" adds a logits recompute.
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


def _logits_gradient(dz: torch.Tensor, t: torch.Tensor | None, labels: torch.Tensor, tok_w: torch.Tensor,
                     logit_scale: float | None) -> torch.Tensor:
    """d(loss)/d(raw logits) of one chunk, in place on its softmax ``dz``: (softmax - onehot) x per-token weight,
    times the softcap and scale derivatives. ``labels`` are clamped (ignored tokens have weight 0)."""
    rows = torch.arange(dz.shape[0], device=dz.device)
    dz[rows, labels] -= 1.0
    dz.mul_(tok_w[:, None])
    if t is not None:  # d(cap * tanh(z/cap))/dz = 1 - tanh^2
        dz.mul_(t.square_().neg_().add_(1.0))
    if logit_scale is not None:
        dz.mul_(logit_scale)
    return dz


_gemm_fp32_out = True  # CUDA bf16/fp16 GEMM with an fp32 output (torch >= 2.8); off after the first refusal


def _addmm_wide(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b accumulated in acc's (wider) dtype. On CUDA a bf16/fp16 GEMM writing fp32 keeps the tensor
    cores; elsewhere (or on a torch without it) the inputs are upcast, an fp32 GEMM with the same result."""
    global _gemm_fp32_out
    if a.dtype != acc.dtype and a.is_cuda and _gemm_fp32_out:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError, NotImplementedError):  # refused at dispatch, before any write
            _gemm_fp32_out = False
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class _Gradients:
    """Gradients of the hidden states, weight and bias, filled one chunk at a time.

    The weight and bias gradients are accumulated over chunks in fp32 for bf16/fp16 weights, as exact as vanilla's
    single matmul (which accumulates in fp32 inside the GEMM) rather than a sum of rounded partials."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 wanted: tuple[bool, ...]):
        self.weight, self.bias_dtype = weight, bias.dtype if bias is not None else None
        acc = torch.float32 if weight.dtype in _LOW_PRECISION else weight.dtype
        self.h = torch.zeros_like(hidden) if wanted[0] else None
        self.w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if wanted[1] else None
        self.b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if wanted[2] else None

    def add_chunk(self, start: int, h: torch.Tensor, dz: torch.Tensor) -> None:
        """Add the chunk of input rows ``start:start + len(h)`` whose fp32 logits gradient is ``dz``."""
        dlogits = dz.to(self.weight.dtype)  # the precision of vanilla's logits gradient
        if self.h is not None:
            self.h[start:start + h.shape[0]] = dlogits @ self.weight
        if self.w is not None:
            _addmm_wide(self.w, dlogits.t(), h)
        if self.b is not None:
            self.b.add_(dlogits.sum(0, dtype=self.b.dtype))

    def release(self, grad_out: torch.Tensor | None = None) -> tuple:
        """(hidden, weight, bias) gradients times the scalar upstream gradient ``grad_out`` (exact for the usual
        1.0 of ``loss.backward()`` and for powers of two), in the inputs' dtypes; the buffers are given up."""
        out = []
        for g, dtype in ((self.h, None), (self.w, self.weight.dtype), (self.b, self.bias_dtype)):
            if g is not None and grad_out is not None:
                g.mul_(grad_out)  # in the buffer's precision, the scalar unrounded (a bf16 0.37 would be off by 1e-3)
            out.append(g.to(dtype) if g is not None and dtype is not None else g)
        self.h = self.w = self.b = None
        return tuple(out)


class ChunkedLMHeadLossFunction(torch.autograd.Function):
    """Per-token (reduction="none") or summed cross-entropy of ``h W^T`` without materialising N x V logits.

    Summed loss with gradients wanted (``grads_in_forward``): each chunk's gradients are formed in the forward,
    right after its loss, while its logits exist -- the logits matmul runs once, as in vanilla, and backward only
    scales them by the upstream scalar. The loss is divided by ``divisor`` inside, so the common mean loss gets
    upstream gradient 1. Per-token losses (whose upstream gradient weights each token) recompute in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens, ignore_index, logit_scale, softcap, per_token,
                divisor, grads_in_forward):
        ctx.chunk_tokens, ctx.ignore_index = chunk_tokens, ignore_index
        ctx.logit_scale, ctx.softcap, ctx.per_token = logit_scale, softcap, per_token
        ctx.autocast = autocast_state(hidden.device.type)
        valid = labels != ignore_index
        # kept as an attribute, not a saved tensor: saved-tensor hooks (checkpoint offload) must not move them
        ctx.grads = _Gradients(hidden, weight, bias, ctx.needs_input_grad[:3]) if grads_in_forward else None
        if ctx.grads is None:
            ctx.save_for_backward(hidden, weight, bias, labels)
        else:
            tok_w = valid * (1.0 / divisor if divisor is not None else 1.0)
            safe_labels = labels.clamp_min(0)
        losses = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk_tokens):
            e = s + chunk_tokens
            if not bool(valid[s:e].any()):
                continue
            z, t = _chunk_logits(hidden[s:e], weight, bias, logit_scale, softcap)
            if ctx.grads is None:
                losses[s:e] = F.cross_entropy(z, labels[s:e], ignore_index=ignore_index, reduction="none")
                continue
            logp = torch.log_softmax(z, dim=-1)  # = F.cross_entropy, keeping log p for the gradient
            del z
            losses[s:e] = F.nll_loss(logp, labels[s:e], ignore_index=ignore_index, reduction="none")
            with torch.autocast(hidden.device.type, enabled=False):  # gradients in full precision, as in backward
                dz = _logits_gradient(logp.exp_(), t, safe_labels[s:e], tok_w[s:e], logit_scale)
                ctx.grads.add_chunk(s, hidden[s:e], dz)
            del logp, dz, t
        if per_token:
            return losses
        total = losses.sum()
        return total / divisor if divisor is not None else total

    @staticmethod
    def backward(ctx, grad_out):
        nones = (None,) * 8
        if ctx.grads is not None:
            grads, ctx.grads = ctx.grads, None
            return (*grads.release(grad_out), *nones)
        if not ctx.saved_tensors:  # gradients formed in forward were already given out
            raise RuntimeError("backward through chunked_lm_head_loss a second time (retain_graph=True) is not "
                               "supported: its gradients are formed in forward and released by the first backward")
        hidden, weight, bias, labels = ctx.saved_tensors
        valid = labels != ctx.ignore_index
        # per-token weight of d(loss)/d(logit): the upstream gradient, zero on ignored tokens
        tok_w = (grad_out if ctx.per_token else grad_out.expand(labels.shape[0])).float() * valid
        grads = _Gradients(hidden, weight, bias, ctx.needs_input_grad[:3])
        safe_labels = labels.clamp_min(0)
        for s in range(0, hidden.shape[0], ctx.chunk_tokens):
            e = s + ctx.chunk_tokens
            if not bool(valid[s:e].any()):
                continue
            with torch.autocast(**ctx.autocast):  # same logits precision as the forward
                z, t = _chunk_logits(hidden[s:e], weight, bias, ctx.logit_scale, ctx.softcap)
            dz = torch.softmax(z, dim=-1)
            del z
            grads.add_chunk(s, hidden[s:e], _logits_gradient(dz, t, safe_labels[s:e], tok_w[s:e], ctx.logit_scale))
            del dz, t
        return (*grads.release(), *nones)


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
    With grad enabled a summed / mean loss computes its gradients during this call (one logits pass instead of
    two), so evaluate under ``torch.no_grad()``, as HF's Trainer and lm-eval do, or that work is wasted.
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
    divisor = None
    if reduction == "mean":
        divisor = num_items_in_batch if num_items_in_batch is not None else (flat_y != ignore_index).sum()
        divisor = divisor.to(flat_h.device) if torch.is_tensor(divisor) else divisor
    grads_in_forward = (reduction != "none" and torch.is_grad_enabled()
                        and any(t is not None and t.requires_grad for t in (flat_h, weight, bias)))
    out = ChunkedLMHeadLossFunction.apply(flat_h, weight, bias, flat_y, chunk, ignore_index, logit_scale,
                                          final_logit_softcapping, reduction == "none", divisor, grads_in_forward)
    return out.view(labels.shape) if reduction == "none" else out
