"""Chunked LM-head + cross-entropy (MsT Algorithm 2 + 4), exact: the N x V logits never exist.

Per chunk of tokens: logits = h W^T (+ b), upcast to fp32 like HF's loss, optionally scaled and softcapped
(Gemma-2/3), and the chunk's cross-entropy. ``chunked_lm_head_loss`` picks one of three modes, each its own
autograd Function around one ``LMHeadSpec``:

- ``SummedLMHeadLoss`` (summed / mean loss, the training default): each chunk's gradients are formed in the forward
  while its logits exist -- dlogits = (softmax - onehot) * per-token weight, dh = dlogits W, dW += dlogits^T h --
  so the logits matmul runs once, as in vanilla (Liger and Apple's CCE do the same); backward only multiplies
  them by the upstream scalar.
- ``PerTokenLMHeadLoss`` (reduction="none": the upstream gradient weights each token, unknown in the forward):
  saves h, W and the labels and recomputes each chunk's logits in backward.
- ``BlockedWeightGradLMHeadLoss`` (summed / mean loss with ``weight_grad_block_rows``): trades one extra logits
  matmul for the V x d fp32 dW accumulator (2.1 GB for Llama3-8B): the forward still forms dh (and db) and keeps
  each token's log-sum-exp; backward recomputes the logits one block of vocabulary rows at a time and accumulates
  only that block's dW in fp32 over the token chunks.

Without a gradient to compute, the loss alone is computed, no Function involved.

Fixes against the official code (docs/paper.md §5.2): dW is *returned* to autograd only (no manual ``.grad`` writes, so
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

import functools
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.autograd.function import FunctionCtx

from .lm_head_common import (LMHeadSpec, TokenStats, _check_reduction, _finish_logits, _flatten_tokens,
                             _logits_gradient, _loss_divisor, _reduce, check_class_weights, lm_head_chunk_tokens,
                             losses_from_log_probs, record_stats, softmax_and_lse, token_losses)
from .recompute import accumulation_dtype, autocast_state

Grads = tuple[torch.Tensor | None, ...]


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  spec: LMHeadSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 logits of one chunk (or vocabulary block), and tanh(z/cap) when softcapping (for its derivative)."""
    return _finish_logits(F.linear(h, weight, bias).float(), spec)


def _chunks_with_labels(valid: torch.Tensor, chunk_tokens: int) -> Iterator[int]:
    """Start rows of the chunks holding at least one valid label (the others add no loss and no gradient), each
    checked just before it runs with one ``bool(any())``: the traced memory planner runs this op on fake tensors
    and answers exactly such reads (``mst/memory/planner/traced.py``)."""
    for s in range(0, valid.shape[0], chunk_tokens):
        if bool(valid[s:s + chunk_tokens].any()):
            yield s


@functools.cache
def _has_wide_gemm(device: torch.device, dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether this torch has a ``dtype`` GEMM on ``device`` that writes ``out_dtype`` (CUDA, torch >= 2.8): tried
    once per device and dtypes, on real 1 x 1 tensors (outside any fake-tensor trace, whose kernels could answer
    otherwise and would be cached); a refusal comes at dispatch."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        try:
            acc = torch.zeros(1, 1, dtype=out_dtype, device=device)
            x = torch.zeros(1, 1, dtype=dtype, device=device)
            torch.addmm(acc, x, x, out_dtype=out_dtype, out=acc)
        except (TypeError, RuntimeError, NotImplementedError):
            return False
    return True


def _addmm_wide(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b accumulated in acc's (wider) dtype. On CUDA a bf16/fp16 GEMM writing fp32 keeps the tensor
    cores; elsewhere (or on a torch without it) the inputs are upcast, an fp32 GEMM with the same result."""
    if a.dtype != acc.dtype and a.is_cuda and _has_wide_gemm(a.device, a.dtype, acc.dtype):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class _Gradients:
    """Gradients of the hidden states, weight and bias, filled one chunk at a time.

    The weight and bias gradients are accumulated over chunks in fp32 for bf16/fp16 weights, as exact as vanilla's
    single matmul (which accumulates in fp32 inside the GEMM) rather than a sum of rounded partials. Held as a ctx
    attribute, not saved tensors: saved-tensor hooks (checkpoint offload) must not move them."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 wanted: tuple[bool, ...]):
        self.weight, self.bias_dtype = weight, bias.dtype if bias is not None else None
        acc = accumulation_dtype(weight.dtype)
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

    def release(self, grad_out: torch.Tensor | None = None) -> Grads:
        """(hidden, weight, bias) gradients times the scalar upstream gradient ``grad_out`` (exact for the usual
        1.0 of ``loss.backward()`` and for powers of two), in the inputs' dtypes; the buffers are given up."""
        out = []
        for g, dtype in ((self.h, None), (self.w, self.weight.dtype), (self.b, self.bias_dtype)):
            if g is not None and grad_out is not None:
                g.mul_(grad_out)  # in the buffer's precision, the scalar unrounded (a bf16 0.37 would be off by 1e-3)
            out.append(g.to(dtype) if g is not None and dtype is not None else g)
        self.h = self.w = self.b = None
        return tuple(out)


def _chunk_losses(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                  spec: LMHeadSpec) -> torch.Tensor:
    """Per-token losses (0 where ignored), one chunk's logits at a time: the loss alone."""
    valid = labels != spec.ignore_index
    losses = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for s in _chunks_with_labels(valid, spec.chunk_tokens):
        e = s + spec.chunk_tokens
        z, _ = _chunk_logits(hidden[s:e], weight, bias, spec)
        record_stats(spec, s, z, hidden.shape[0])
        losses[s:e] = token_losses(z, labels[s:e], spec)
    return losses


def _chunk_losses_and_gradients(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                labels: torch.Tensor, spec: LMHeadSpec, grads: _Gradients,
                                lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses as ``_chunk_losses``, and each chunk's gradients of the summed loss over the divisor
    (upstream gradient 1) added to ``grads`` while the chunk's logits exist; with ``lse``, each token's
    log-sum-exp is written there. Returns the losses and the per-token weights of the logits gradient (1 / divisor,
    0 on ignored tokens)."""
    valid = labels != spec.ignore_index
    tok_w = valid * spec.token_weight(labels) * (1.0 / spec.divisor if spec.divisor is not None else 1.0)
    safe_labels = labels.clamp_min(0)
    losses = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for s in _chunks_with_labels(valid, spec.chunk_tokens):
        e = s + spec.chunk_tokens
        z, t = _chunk_logits(hidden[s:e], weight, bias, spec)
        chunk_lse = torch.logsumexp(z, dim=-1) if lse is not None or spec.z_loss or spec.stats else None
        if lse is not None:
            lse[s:e] = chunk_lse
        record_stats(spec, s, z, hidden.shape[0], chunk_lse)
        logp = torch.log_softmax(z, dim=-1)  # = F.cross_entropy, keeping log p for the gradient
        del z
        losses[s:e] = losses_from_log_probs(logp, labels[s:e], spec, chunk_lse)
        with torch.autocast(hidden.device.type, enabled=False):  # gradients in full precision, as in backward
            dz = _logits_gradient(logp.exp_(), t, safe_labels[s:e], tok_w[s:e], spec, lse=chunk_lse)
            grads.add_chunk(s, hidden[s:e], dz)
        del logp, dz, t
    return losses, tok_w


def _take_forward_gradients(ctx: FunctionCtx) -> _Gradients:
    """The gradients the forward formed, handed out once: a second backward has none left."""
    if ctx.grads is None:
        raise RuntimeError("backward through chunked_lm_head_loss a second time (retain_graph=True) is not "
                           "supported: its gradients are formed in forward and released by the first backward")
    grads, ctx.grads = ctx.grads, None
    return grads


def _weight_grad_by_vocab_blocks(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 labels: torch.Tensor, lse: torch.Tensor, tok_w: torch.Tensor, spec: LMHeadSpec,
                                 grad_out: torch.Tensor, autocast: dict) -> torch.Tensor:
    """dW of the summed loss, one block of vocabulary rows at a time: the block's logits are recomputed per token
    chunk and turned into probabilities with the forward's log-sum-exp, so only a block x d fp32 accumulator exists.
    A backward chunk has V / (2 block_rows) times the forward's tokens: half its logits (the fp32 copies of the
    block's gradient and of the hidden chunk take the rest), in larger GEMMs than the forward's chunk would give.
    ``labels`` clamped; ignored tokens have weight 0 (and lse = inf where the forward skipped them)."""
    block_rows = spec.weight_grad_block_rows
    chunk_tokens = spec.chunk_tokens * max(1, weight.shape[0] // (2 * block_rows))
    chunks = [s for s in range(0, hidden.shape[0], chunk_tokens) if not bool(lse[s:s + chunk_tokens].isinf().all())]
    grad_w = torch.empty_like(weight)
    for v0 in range(0, weight.shape[0], block_rows):
        v1 = min(v0 + block_rows, weight.shape[0])
        acc = torch.zeros((v1 - v0, weight.shape[1]), dtype=accumulation_dtype(weight.dtype), device=weight.device)
        block_bias = bias[v0:v1] if bias is not None else None
        for s in chunks:
            e = s + chunk_tokens
            with torch.autocast(**autocast):  # same logits precision as the forward
                z, t = _chunk_logits(hidden[s:e], weight[v0:v1], block_bias, spec)
            dz = z.sub_(lse[s:e, None]).exp_()  # softmax over the whole vocabulary, this block's columns
            hits = (labels[s:e] >= v0) & (labels[s:e] < v1)
            cols = (labels[s:e] - v0).clamp_(0, v1 - v0 - 1)
            with torch.autocast(hidden.device.type, enabled=False):
                dz = _logits_gradient(dz, t, cols, tok_w[s:e], spec, hits.to(dz.dtype), lse[s:e], weight.shape[0])
                _addmm_wide(acc, dz.to(weight.dtype).t(), hidden[s:e])
            del z, t, dz
        grad_w[v0:v1] = acc.mul_(grad_out)
    return grad_w


class SummedLMHeadLoss(torch.autograd.Function):
    """Summed cross-entropy over ``spec.divisor`` (None: the plain sum), gradients formed in the forward.

    The upstream gradient of a summed loss is one scalar, so each chunk's gradients can be made right after its
    loss, while its logits exist: the logits matmul runs once, as in vanilla, and backward only scales the
    gradients by that scalar. The loss is divided by the divisor inside, so the common mean loss gets upstream
    gradient 1 (exact scaling). Nothing is saved for backward.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, spec: LMHeadSpec) -> torch.Tensor:
        """The loss, and its gradients for an upstream gradient of 1 kept in ``ctx.grads``."""
        ctx.grads = _Gradients(hidden, weight, bias, ctx.needs_input_grad[:3])
        losses, _ = _chunk_losses_and_gradients(hidden, weight, bias, labels, spec, ctx.grads)
        return _reduce(losses, False, spec.divisor)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> Grads:
        """The forward's gradients times the upstream scalar."""
        return (*_take_forward_gradients(ctx).release(grad_out), None, None)


class PerTokenLMHeadLoss(torch.autograd.Function):
    """Per-token cross-entropy (0 where ignored); backward recomputes each chunk's logits.

    Each token's upstream gradient weights its logits gradient and is only known in backward, so the forward keeps
    no gradients: it saves h, W, b and the labels, and backward makes each chunk's logits again (under the
    forward's autocast) and forms its gradients.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, spec: LMHeadSpec) -> torch.Tensor:
        """The losses; the inputs saved for the recompute."""
        ctx.spec, ctx.autocast = spec, autocast_state(hidden.device.type)
        ctx.save_for_backward(hidden, weight, bias, labels)
        return _chunk_losses(hidden, weight, bias, labels, spec)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> Grads:
        """Per chunk: logits again, d(loss)/d(logits) weighted by each token's upstream gradient, then dh, dW, db."""
        hidden, weight, bias, labels = ctx.saved_tensors
        spec = ctx.spec
        valid = labels != spec.ignore_index
        tok_w = grad_out.float() * valid * spec.token_weight(labels)  # zero on ignored tokens
        grads = _Gradients(hidden, weight, bias, ctx.needs_input_grad[:3])
        safe_labels = labels.clamp_min(0)
        for s in _chunks_with_labels(valid, spec.chunk_tokens):
            e = s + spec.chunk_tokens
            with torch.autocast(**ctx.autocast):  # same logits precision as the forward
                z, t = _chunk_logits(hidden[s:e], weight, bias, spec)
            dz, chunk_lse = softmax_and_lse(z, spec)
            del z
            grads.add_chunk(s, hidden[s:e], _logits_gradient(dz, t, safe_labels[s:e], tok_w[s:e], spec,
                                                             lse=chunk_lse))
            del dz, t
        return (*grads.release(), None, None)


class BlockedWeightGradLMHeadLoss(torch.autograd.Function):
    """Summed cross-entropy as ``SummedLMHeadLoss``, its weight gradient made in backward by vocabulary blocks.

    The forward forms dh and db as ``SummedLMHeadLoss`` does but no V x d dW buffer; it keeps each token's
    log-sum-exp (inf on skipped chunks) and saves h, W, b and the labels, from which backward recomputes the logits
    ``spec.weight_grad_block_rows`` vocabulary rows at a time (``_weight_grad_by_vocab_blocks``).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, spec: LMHeadSpec) -> torch.Tensor:
        """The loss; dh and db for an upstream gradient of 1 in ``ctx.grads``; each token's log-sum-exp and
        logits-gradient weight in ``ctx.lse`` and ``ctx.tok_w`` (attributes, not saved tensors: saved-tensor hooks
        must not move them)."""
        ctx.spec, ctx.autocast = spec, autocast_state(hidden.device.type)
        needs = ctx.needs_input_grad
        ctx.grads = _Gradients(hidden, weight, bias, (needs[0], False, needs[2]))
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.lse = torch.full((hidden.shape[0],), math.inf, dtype=torch.float32, device=hidden.device)
        losses, ctx.tok_w = _chunk_losses_and_gradients(hidden, weight, bias, labels, spec, ctx.grads, ctx.lse)
        return _reduce(losses, False, spec.divisor)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> Grads:
        """dh and db from the forward times the upstream scalar; dW by vocabulary blocks."""
        grad_h, _, grad_b = _take_forward_gradients(ctx).release(grad_out)
        hidden, weight, bias, labels = ctx.saved_tensors
        grad_w = _weight_grad_by_vocab_blocks(hidden, weight, bias, labels.clamp_min(0), ctx.lse, ctx.tok_w, ctx.spec,
                                              grad_out, ctx.autocast)
        del ctx.lse, ctx.tok_w
        return (grad_h, grad_w, grad_b, None, None)


def _lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                  spec: LMHeadSpec, per_token: bool) -> torch.Tensor:
    """Loss of (N, d) ``hidden`` against (N,) ``labels`` by the mode that fits: the loss alone when nothing needs a
    gradient, else per-token losses recomputed in backward, or a summed loss with gradients formed in the forward
    (the weight gradient by vocabulary blocks with ``spec.weight_grad_block_rows`` and a weight that needs one)."""
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))):
        with torch.no_grad():
            return _reduce(_chunk_losses(hidden, weight, bias, labels, spec), per_token, spec.divisor)
    if per_token:
        return PerTokenLMHeadLoss.apply(hidden, weight, bias, labels, spec)
    if spec.weight_grad_block_rows is not None and weight.requires_grad:
        return BlockedWeightGradLMHeadLoss.apply(hidden, weight, bias, labels, spec)
    return SummedLMHeadLoss.apply(hidden, weight, bias, labels, spec)


def chunked_lm_head_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: torch.Tensor | None = None, chunk_tokens: int | None = None,
                         num_chunks: int | None = None, logits_budget_bytes: int | None = None,
                         ignore_index: int = -100, reduction: str = "mean",
                         num_items_in_batch: int | torch.Tensor | None = None, logit_scale: float | None = None,
                         final_logit_softcapping: float | None = None,
                         weight_grad_block_rows: int | None = None, label_smoothing: float = 0.0,
                         z_loss: float = 0.0, token_stats: TokenStats | None = None,
                         class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels`` (already aligned, i.e. shifted), chunked.

    hidden: (..., d); labels: (...) with ``ignore_index`` for positions that do not count.
    reduction="mean": sum / ``num_items_in_batch`` if given, else sum / (number of valid labels) -- HF's
    ``ForCausalLMLoss`` semantics, including NaN when every label is ignored and no ``num_items_in_batch`` is given.
    reduction="sum": summed loss; reduction="none": per-token losses shaped like ``labels`` (0 where ignored).
    With grad enabled a summed / mean loss computes its gradients during this call (one logits pass instead of
    two), so evaluate under ``torch.no_grad()``, as HF's Trainer and lm-eval do, or that work is wasted.
    weight_grad_block_rows: make the weight gradient in backward, this many vocabulary rows at a time, instead of
    accumulating it in a V x d fp32 buffer during the forward (saves V x d x 4 bytes; costs one more logits matmul).
    label_smoothing: as ``F.cross_entropy``'s (eps in [0, 1]); z_loss: adds z_loss x logsumexp(logits)^2 per valid
    token (Liger-Kernel's ``lse_square_scale``), reduced with the cross-entropy (``mst.ops.lm_head_common``).
    token_stats: a ``TokenStats`` the forward fills with each token's log-sum-exp and argmax prediction.
    class_weights: (V,) per-class weights as ``F.cross_entropy(weight=)`` (not with label_smoothing / z_loss).
    """
    check_class_weights(class_weights, weight.shape[0])
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
    spec = LMHeadSpec(chunk, ignore_index, logit_scale, final_logit_softcapping,
                      _loss_divisor(flat_y, ignore_index, reduction, num_items_in_batch, class_weights),
                      weight_grad_block_rows, label_smoothing, z_loss, token_stats, class_weights)
    out = _lm_head_loss(flat_h, weight, bias, flat_y, spec, reduction == "none")
    return out.view(labels.shape) if reduction == "none" else out
