"""Chunked LM-head + cross-entropy through the head *module*, exact: the N x V logits never exist.

``chunked_lm_head_loss`` multiplies by ``lm_head.weight`` itself, so whatever the head module does beyond h W^T + b
-- a PEFT LoRA adapter on lm_head, a subclass's own forward, a forward hook -- is skipped there (another loss, and no
gradient for the adapter). Here ``head_fn`` (e.g. the lm_head module itself) makes each chunk's logits:

forward: per chunk of tokens, under no_grad, logits = head_fn(h_chunk), upcast like HF's loss (``.float()``; float64
stays float64), scaled / softcapped as in ``chunked_lm_head_loss``, and the chunk's cross-entropy. Only the hidden
states, the labels and each chunk's RNG state are kept.
backward: per chunk, head_fn again with grad enabled, from that chunk's forward RNG state (the same dropout masks,
``recompute.ChunkRNGStates``) and under the forward's autocast; the logits gradient in closed form (softmax -
onehot, ``lm_head_common``, shared with ``chunked_lm_head_loss``); autograd then gives the hidden chunk's and the
params' gradients, which are summed over chunks (fp32 for bf16/fp16 params, ``recompute.ParamGrads``).
Chunks whose labels are all ignored are skipped in both passes: head_fn is not called on them; except with DeepSpeed
ZeRO-3 parameters, which every call of the head module gathers with a collective: there every chunk runs, so ranks
make the same calls whatever their labels (a rank whose shard ends in padding skipped chunks and the others waited
for it), and a rank with fewer tokens runs empty chunks up to the largest count (``recompute.chunk_count_over_ranks``).

Legend: N = tokens (batch x seq flattened), d = hidden, V = vocab, C = chunk tokens.
Memory: one chunk's C x V logits and their fp32 copies at a time, plus the saved N x d hidden states.
Cost: one head forward per chunk more than vanilla (the recompute: the head's graph is not kept), and forward hooks
of the head see every chunk twice (forward and recompute).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.autograd.function import FunctionCtx

from .lm_head_common import (LMHeadSpec, TokenStats, _check_reduction, _finish_logits, _flatten_tokens,
                             _logits_gradient, _loss_divisor, _reduce, check_class_weights, lm_head_chunk_tokens,
                             record_stats, softmax_and_lse, token_losses)
from .recompute import ChunkRNGStates, ParamGrads, autocast_state, chunk_count_over_ranks, zero3_partitioned

HeadFn = Callable[[torch.Tensor], torch.Tensor]
_N_ARGS = 6  # ChunkedModuleLMHeadLossFunction.forward's inputs before *params


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """A detached copy of the logits in at least fp32, which ``_finish_logits`` may modify in place without touching
    head_fn's output (the recompute's graph may have saved it)."""
    return logits.detach().to(torch.promote_types(logits.dtype, torch.float32), copy=True)


def _labelled_chunks(valid: torch.Tensor, chunk_tokens: int) -> list[int]:
    """Start rows of the chunks holding at least one valid label (one host sync for all chunks)."""
    n_chunks = -(-valid.shape[0] // chunk_tokens)
    padded = valid.new_zeros(n_chunks * chunk_tokens)
    padded[:valid.shape[0]] = valid
    return (padded.view(n_chunks, chunk_tokens).any(dim=1).nonzero().flatten() * chunk_tokens).tolist()


def _chunk_losses(hidden: torch.Tensor, labels: torch.Tensor, head_fn: HeadFn, starts: Sequence[int],
                  spec: LMHeadSpec, rng: ChunkRNGStates | None) -> torch.Tensor:
    """Per-token losses (0 where ignored), one chunk's logits at a time; call without grad. ``rng`` records each
    chunk's starting RNG state for the recompute."""
    losses = None
    for s in starts:
        e = s + spec.chunk_tokens
        if rng is not None:
            rng.capture()
        z, _ = _finish_logits(_upcast(head_fn(hidden[s:e])), spec)
        if rng is not None:
            rng.settle()
        if s < hidden.shape[0]:  # not one of ZeRO-3's empty chunks
            record_stats(spec, s, z, hidden.shape[0])
        if losses is None:
            losses = z.new_zeros(hidden.shape[0])
        losses[s:e] = token_losses(z, labels[s:e], spec)
        del z
    return losses if losses is not None else hidden.new_zeros(hidden.shape[0], dtype=torch.float32)


class ChunkedModuleLMHeadLossFunction(torch.autograd.Function):
    """Cross-entropy of ``head_fn(hidden)`` chunk by chunk: per-token losses, or their sum divided by ``divisor``
    (None: plain sum). Saves the hidden states and labels; backward recomputes each chunk's logits (see the module
    docstring). ``starts`` are the chunks' first rows (the chunks with a valid label); ``params`` must be every
    tensor ``head_fn`` closes over that may need a gradient, each once: they are declared as inputs so that autograd
    routes their gradients back through this node.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, hidden: torch.Tensor, labels: torch.Tensor, head_fn: HeadFn, starts: list[int],
                spec: LMHeadSpec, per_token: bool, *params: torch.Tensor) -> torch.Tensor:
        """The loss, each chunk under no_grad (the head's graph is not kept), its RNG state recorded."""
        ctx.head_fn, ctx.params, ctx.starts, ctx.spec, ctx.per_token = head_fn, params, starts, spec, per_token
        ctx.autocast, ctx.rng = autocast_state(hidden.device.type), ChunkRNGStates(hidden)
        ctx.save_for_backward(hidden, labels)
        return _reduce(_chunk_losses(hidden, labels, head_fn, starts, spec, ctx.rng), per_token, spec.divisor)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Per chunk: head_fn again (forward's RNG and autocast), the logits gradient in closed form, then autograd
        for the hidden chunk's and the params' gradients."""
        hidden, labels = ctx.saved_tensors
        spec = ctx.spec
        want_h = ctx.needs_input_grad[0]
        param_grads = ParamGrads(ctx.params, ctx.needs_input_grad[_N_ARGS:])
        # per-token weight of d(loss)/d(logit): the upstream gradient (over the divisor), zero on ignored tokens
        upstream = grad_out if ctx.per_token else grad_out.expand(labels.shape[0])
        if spec.divisor is not None:
            upstream = upstream / spec.divisor
        tok_w = upstream * (labels != spec.ignore_index) * spec.token_weight(labels)
        safe_labels = labels.clamp_min(0)
        grad_h = torch.zeros_like(hidden) if want_h else None
        for i, s in enumerate(ctx.starts):
            e = s + spec.chunk_tokens
            hc = hidden[s:e].detach().requires_grad_(want_h)
            with ctx.rng.replay(i), torch.enable_grad(), torch.autocast(**ctx.autocast):
                logits = ctx.head_fn(hc)
            with torch.autocast(hidden.device.type, enabled=False):  # the loss gradient in full precision
                z, t = _finish_logits(_upcast(logits), spec)
                dz, chunk_lse = softmax_and_lse(z, spec)
                del z
                dz = _logits_gradient(dz, t, safe_labels[s:e], tok_w[s:e].to(dz.dtype), spec, lse=chunk_lse)
            inputs = ([hc] if want_h else []) + param_grads.wanted
            # dz in the logits' dtype: the precision of vanilla's logits gradient
            grads = torch.autograd.grad(logits, inputs, dz.to(logits.dtype), allow_unused=True)
            del logits, dz, t
            if want_h:
                if grads[0] is not None:
                    grad_h[s:e] = grads[0]
                grads = grads[1:]
            param_grads.add(grads)
        # every label ignored: no chunk ran; zero gradients, as autograd gives for HF's loss
        return (grad_h, *[None] * (_N_ARGS - 1), *param_grads.result(zeros_if_unused=not ctx.starts))


def chunked_module_lm_head_loss(hidden: torch.Tensor, head_fn: HeadFn, params: Sequence[torch.Tensor],
                                labels: torch.Tensor, *, vocab_size: int | None = None,
                                chunk_tokens: int | None = None, num_chunks: int | None = None,
                                logits_budget_bytes: int | None = None, ignore_index: int = -100,
                                reduction: str = "mean", num_items_in_batch: int | torch.Tensor | None = None,
                                logit_scale: float | None = None, final_logit_softcapping: float | None = None,
                                label_smoothing: float = 0.0, z_loss: float = 0.0,
                                token_stats: TokenStats | None = None,
                                class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of ``head_fn(hidden)`` against ``labels`` (already aligned, i.e. shifted), chunked, where
    ``head_fn`` is any token-wise head (e.g. the lm_head module, so its LoRA adapter, subclass forward and hooks
    run). Same loss semantics as ``chunked_lm_head_loss``.

    head_fn: (C, d) hidden rows -> (C, V) logits; may draw random numbers (dropout): backward replays them.
    params: every tensor head_fn uses that may need a gradient (e.g. ``[p for p in lm_head.parameters() if
    p.requires_grad]``); a tensor that needs a gradient but is not listed gets none from this loss.
    hidden: (..., d); labels: (...) with ``ignore_index`` for positions that do not count.
    vocab_size: V, for the default chunk rule (M = ceil(V / d) chunks, ``lm_head_chunk_tokens``) and for
    ``logits_budget_bytes``; not needed with ``chunk_tokens`` or ``num_chunks``.
    reduction="mean": sum / ``num_items_in_batch`` if given, else sum / (number of valid labels) -- HF's
    ``ForCausalLMLoss`` semantics, including NaN (with zero gradients) when every label is ignored and no
    ``num_items_in_batch`` is given. reduction="sum": summed loss; reduction="none": per-token losses shaped like
    ``labels`` (0 where ignored). The loss is fp32 (float64 for a float64 head). label_smoothing, z_loss,
    token_stats, class_weights: as ``chunked_lm_head_loss``'s (class_weights needs ``vocab_size``).
    """
    _check_reduction(reduction)
    flat_h, flat_y = _flatten_tokens(hidden, labels)
    if vocab_size is None and chunk_tokens is None and num_chunks is None:
        raise ValueError("vocab_size is needed for the default chunk rule and for logits_budget_bytes; "
                         "or give chunk_tokens / num_chunks")
    chunk = lm_head_chunk_tokens(max(flat_h.shape[0], 1), vocab_size or 0, flat_h.shape[1],
                                 chunk_tokens=chunk_tokens, num_chunks=num_chunks,
                                 logits_budget_bytes=logits_budget_bytes)
    if class_weights is not None:
        if vocab_size is None:
            raise ValueError("class_weights needs vocab_size (the number of classes)")
        check_class_weights(class_weights, vocab_size)
    divisor = _loss_divisor(flat_y, ignore_index, reduction, num_items_in_batch, class_weights)
    spec = LMHeadSpec(chunk, ignore_index, logit_scale, final_logit_softcapping, divisor,
                      label_smoothing=label_smoothing, z_loss=z_loss, stats=token_stats, class_weights=class_weights)
    params = tuple(params)
    if zero3_partitioned(params):  # every chunk, as many as any rank has: each head call is a collective
        n_tokens = flat_h.shape[0]
        starts = list(range(0, n_tokens, chunk))
        starts += [n_tokens] * (chunk_count_over_ranks(len(starts), params) - len(starts))  # empty chunks
    else:
        starts = _labelled_chunks(flat_y != ignore_index, chunk)
    per_token = reduction == "none"
    if torch.is_grad_enabled() and (flat_h.requires_grad or any(p.requires_grad for p in params)):
        out = ChunkedModuleLMHeadLossFunction.apply(flat_h, flat_y, head_fn, starts, spec, per_token, *params)
    else:  # nothing needs a gradient: the loss alone, no RNG states kept
        with torch.no_grad():
            losses = _chunk_losses(flat_h, flat_y, head_fn, starts, spec, None)
        out = _reduce(losses, per_token, divisor)
    return out.view(labels.shape) if per_token else out
