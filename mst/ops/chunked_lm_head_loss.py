"""Chunked LM-head + cross-entropy (MsT Algorithm 2 + 4), exact: the S x V logits never exist.

Forward computes, one mini-sequence of tokens at a time, logits = h W^T (+ b), upcasts to fp32 like HF's loss,
applies optional logit scaling and final-logit softcapping (Gemma-2/3), and accumulates the summed cross-entropy.
For a summed / mean loss that needs gradients, the same loop also forms each chunk's gradient while its logits
exist -- dlogits = (softmax - onehot) * per-token weight, dh = dlogits W, dW += dlogits^T h -- so the logits matmul
runs once, as in vanilla (Liger and Apple's CCE do the same); backward only multiplies by the upstream scalar.
Per-token losses (reduction="none", upstream gradient per token) save h, W and the labels and recompute each
chunk's logits in backward instead.

``weight_grad_block_rows`` trades one extra logits matmul for the V x d fp32 accumulator (2.1 GB for Llama3-8B):
the forward still forms dh (and db) and keeps each token's log-sum-exp; backward recomputes the logits one block of
vocabulary rows at a time and accumulates only that block's dW in fp32 over the token chunks.

Fixes against the official code (paper.md §5.2): dW is *returned* to autograd only (no manual ``.grad`` writes, so
no 2x and no blow-up under gradient accumulation; tied embeddings just add up); chunks are a fixed size with a
remainder chunk (no dropped tail tokens, no loss 0 when S < M); the loss is normalised by the global count of valid
tokens (or HF's ``num_items_in_batch``); softcapping is applied.

Legend: N = tokens (batch x seq flattened), d = hidden, V = vocab, C = chunk tokens.
Memory: O(C x V) fp32 transient instead of O(N x V); plus a V x d fp32 gradient accumulator for bf16/fp16 weights,
held from the forward to the backward of the loss (nothing else runs in between in a training step), or with
``weight_grad_block_rows`` = B a B x d one (and the hidden states kept for backward).
Cost: vanilla's three LM-head matmuls (logits, dh, dW); reduction="none" and ``weight_grad_block_rows`` add a logits
recompute.
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
    return _finish_logits(F.linear(h, weight, bias).float(), logit_scale, softcap)


def _finish_logits(z: torch.Tensor, logit_scale: float | None,
                   softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and softcap the upcast logits ``z`` in place (``z`` must be a tensor of the caller's own); also
    tanh(z/cap) when softcapping (needed for its derivative)."""
    if logit_scale is not None:
        z.mul_(logit_scale)
    if softcap is None:
        return z, None
    t = z.div_(softcap).tanh_()
    return t * softcap, t


def _logits_gradient(dz: torch.Tensor, t: torch.Tensor | None, labels: torch.Tensor, tok_w: torch.Tensor,
                     logit_scale: float | None, hits: torch.Tensor | float = 1.0) -> torch.Tensor:
    """d(loss)/d(raw logits) of one chunk, in place on its softmax ``dz``: (softmax - onehot) x per-token weight,
    times the softcap and scale derivatives. ``labels`` are clamped (ignored tokens have weight 0); ``hits`` is 1
    where a token's label column lies in ``dz`` (a vocabulary block may not hold it)."""
    rows = torch.arange(dz.shape[0], device=dz.device)
    dz[rows, labels] -= hits
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


def _weight_grad_by_vocab_blocks(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 labels: torch.Tensor, lse: torch.Tensor, tok_w: torch.Tensor, chunk_tokens: int,
                                 block_rows: int, logit_scale: float | None, softcap: float | None,
                                 grad_out: torch.Tensor, autocast: dict) -> torch.Tensor:
    """dW of the summed loss, one block of vocabulary rows at a time: the block's logits are recomputed per token
    chunk and turned into probabilities with the forward's log-sum-exp, so only a block x d fp32 accumulator exists.
    A backward chunk has V / (2 block_rows) times the forward's tokens: half its logits (the fp32 copies of the
    block's gradient and of the hidden chunk take the rest), in larger GEMMs than the forward's chunk would give.
    ``labels`` clamped; ignored tokens have weight 0 (and lse = inf where the forward skipped them)."""
    chunk_tokens *= max(1, weight.shape[0] // (2 * block_rows))
    chunks = [s for s in range(0, hidden.shape[0], chunk_tokens) if not bool(lse[s:s + chunk_tokens].isinf().all())]
    grad_w = torch.empty_like(weight)
    acc_dtype = torch.float32 if weight.dtype in _LOW_PRECISION else weight.dtype
    for v0 in range(0, weight.shape[0], block_rows):
        v1 = min(v0 + block_rows, weight.shape[0])
        acc = torch.zeros((v1 - v0, weight.shape[1]), dtype=acc_dtype, device=weight.device)
        block_bias = bias[v0:v1] if bias is not None else None
        for s in chunks:
            e = s + chunk_tokens
            with torch.autocast(**autocast):  # same logits precision as the forward
                z, t = _chunk_logits(hidden[s:e], weight[v0:v1], block_bias, logit_scale, softcap)
            dz = z.sub_(lse[s:e, None]).exp_()  # softmax over the whole vocabulary, this block's columns
            hits = (labels[s:e] >= v0) & (labels[s:e] < v1)
            cols = (labels[s:e] - v0).clamp_(0, v1 - v0 - 1)
            with torch.autocast(hidden.device.type, enabled=False):
                dz = _logits_gradient(dz, t, cols, tok_w[s:e], logit_scale, hits.to(dz.dtype))
                _addmm_wide(acc, dz.to(weight.dtype).t(), hidden[s:e])
            del z, t, dz
        grad_w[v0:v1] = acc.mul_(grad_out)
    return grad_w


class ChunkedLMHeadLossFunction(torch.autograd.Function):
    """Per-token (reduction="none") or summed cross-entropy of ``h W^T`` without materialising N x V logits.

    Summed loss with gradients wanted (``grads_in_forward``): each chunk's gradients are formed in the forward,
    right after its loss, while its logits exist -- the logits matmul runs once, as in vanilla, and backward only
    scales them by the upstream scalar. The loss is divided by ``divisor`` inside, so the common mean loss gets
    upstream gradient 1. Per-token losses (whose upstream gradient weights each token) recompute in backward.
    ``weight_grad_block_rows`` (with ``grads_in_forward``): dW is made in backward by vocabulary blocks instead.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_tokens, ignore_index, logit_scale, softcap, per_token,
                divisor, grads_in_forward, weight_grad_block_rows):
        ctx.chunk_tokens, ctx.ignore_index = chunk_tokens, ignore_index
        ctx.logit_scale, ctx.softcap, ctx.per_token = logit_scale, softcap, per_token
        ctx.autocast = autocast_state(hidden.device.type)
        ctx.grads_in_forward = grads_in_forward
        valid = labels != ignore_index
        blocked = grads_in_forward and weight_grad_block_rows is not None and ctx.needs_input_grad[1]
        ctx.block_rows = weight_grad_block_rows if blocked else None
        # kept as an attribute, not a saved tensor: saved-tensor hooks (checkpoint offload) must not move them
        wanted = (ctx.needs_input_grad[0], ctx.needs_input_grad[1] and not blocked, ctx.needs_input_grad[2])
        ctx.grads = _Gradients(hidden, weight, bias, wanted) if grads_in_forward else None
        if ctx.grads is None or blocked:
            ctx.save_for_backward(hidden, weight, bias, labels)
        if ctx.grads is not None:
            tok_w = valid * (1.0 / divisor if divisor is not None else 1.0)
            safe_labels = labels.clamp_min(0)
        if blocked:  # a chunk skipped below gets lse = inf: probabilities 0 (its token weights are 0 too)
            ctx.tok_w = tok_w
            ctx.lse = torch.full((hidden.shape[0],), math.inf, dtype=torch.float32, device=hidden.device)
        losses = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk_tokens):
            e = s + chunk_tokens
            if not bool(valid[s:e].any()):
                continue
            z, t = _chunk_logits(hidden[s:e], weight, bias, logit_scale, softcap)
            if ctx.grads is None:
                losses[s:e] = F.cross_entropy(z, labels[s:e], ignore_index=ignore_index, reduction="none")
                continue
            if blocked:
                ctx.lse[s:e] = torch.logsumexp(z, dim=-1)
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
        nones = (None,) * 9
        if ctx.grads_in_forward:
            if ctx.grads is None:  # gradients formed in forward were already given out
                raise RuntimeError("backward through chunked_lm_head_loss a second time (retain_graph=True) is not "
                                   "supported: its gradients are formed in forward and released by the first "
                                   "backward")
            grads, ctx.grads = ctx.grads, None
            grad_h, grad_w, grad_b = grads.release(grad_out)
            if ctx.block_rows is not None:
                hidden, weight, bias, labels = ctx.saved_tensors
                grad_w = _weight_grad_by_vocab_blocks(
                    hidden, weight, bias, labels.clamp_min(0), ctx.lse, ctx.tok_w, ctx.chunk_tokens, ctx.block_rows,
                    ctx.logit_scale, ctx.softcap, grad_out, ctx.autocast)
                del ctx.lse, ctx.tok_w
            return (grad_h, grad_w, grad_b, *nones)
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


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _flatten_tokens(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, d) hidden states and (N,) labels on their device, after checking that they align."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not align")
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    return flat_h, labels.reshape(-1).to(flat_h.device)


def _loss_divisor(labels: torch.Tensor, ignore_index: int, reduction: str,
                 num_items_in_batch: int | torch.Tensor | None) -> torch.Tensor | None:
    """What the summed loss is divided by: for "mean", HF's ``num_items_in_batch`` if given, else the global count
    of valid labels (0 when all are ignored: a NaN loss, as HF's); None for "sum" / "none"."""
    if reduction != "mean":
        return None
    divisor = num_items_in_batch if num_items_in_batch is not None else (labels != ignore_index).sum()
    # a tensor also for a Python number: HF divides the summed loss by it as a tensor (inf / NaN for 0)
    return torch.as_tensor(divisor, device=labels.device)


def chunked_lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: torch.Tensor | None = None, chunk_tokens: int | None = None,
                         num_chunks: int | None = None, logits_budget_bytes: int | None = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         num_items_in_batch: int | torch.Tensor | None = None, logit_scale: float | None = None,
                         final_logit_softcapping: float | None = None,
                         weight_grad_block_rows: int | None = None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` (already aligned, i.e. shifted), chunked.

    hidden: (..., d); labels: (...) with ``ignore_index`` for positions that do not count.
    reduction="mean": sum / ``num_items_in_batch`` if given, else sum / (number of valid labels) -- HF's
    ``ForCausalLMLoss`` semantics, including NaN when every label is ignored and no ``num_items_in_batch`` is given.
    reduction="sum": summed loss; reduction="none": per-token losses shaped like ``labels`` (0 where ignored).
    With grad enabled a summed / mean loss computes its gradients during this call (one logits pass instead of
    two), so evaluate under ``torch.no_grad()``, as HF's Trainer and lm-eval do, or that work is wasted.
    weight_grad_block_rows: make the weight gradient in backward, this many vocabulary rows at a time, instead of
    accumulating it in a V x d fp32 buffer during the forward (saves V x d x 4 bytes; costs one more logits matmul).
    """
    _check_reduction(reduction)
    if weight_grad_block_rows is not None and (not isinstance(weight_grad_block_rows, int)
                                               or weight_grad_block_rows <= 0):
        raise ValueError(f"weight_grad_block_rows must be a positive integer, got {weight_grad_block_rows!r}")
    if weight_grad_block_rows is not None and reduction == "none":
        raise ValueError("weight_grad_block_rows applies to summed / mean losses; reduction='none' recomputes "
                         "the logits in backward with a V x d accumulator")
    flat_h, flat_y = _flatten_tokens(hidden, labels)
    chunk = lm_head_chunk_tokens(max(flat_h.shape[0], 1), weight.shape[0], weight.shape[1],
                                 chunk_tokens=chunk_tokens, num_chunks=num_chunks,
                                 logits_budget_bytes=logits_budget_bytes)
    divisor = _loss_divisor(flat_y, ignore_index, reduction, num_items_in_batch)
    grads_in_forward = (reduction != "none" and torch.is_grad_enabled()
                        and any(t is not None and t.requires_grad for t in (flat_h, weight, bias)))
    out = ChunkedLMHeadLossFunction.apply(flat_h, weight, bias, flat_y, chunk, ignore_index, logit_scale,
                                          final_logit_softcapping, reduction == "none", divisor, grads_in_forward,
                                          weight_grad_block_rows)
    return out.view(labels.shape) if reduction == "none" else out
