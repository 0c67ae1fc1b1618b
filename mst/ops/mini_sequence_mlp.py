"""Mini-sequence MLP (MsT Algorithm 1 + 3), exact and actually memory-saving.

The MLP of a decoder layer is token-wise, so its S x I intermediates (gate, up, act(gate)*up) can be produced one
chunk of tokens at a time. The paper's official code ran a plain Python loop under autograd, which still saves every
chunk's intermediates for backward (docs/paper.md §5.2 item 5). Here the forward runs each chunk under ``no_grad`` and
saves only the input X; backward recomputes one chunk at a time and asks autograd for that chunk's input and weight
gradients, so peak intermediate memory is one chunk's, and weight gradients still reach ``.grad`` through autograd
(no manual ``.grad`` writes: DDP / FSDP / ZeRO hooks and gradient accumulation behave as with the plain module).

The recompute replays each chunk's forward RNG state and autocast settings (``recompute``), so an ``fn`` with
dropout (nn.Dropout, a LoRA adapter's lora_dropout) gets the gradient of the output it returned, as under
torch.utils.checkpoint.

Legend: N = tokens (batch x seq flattened), d = hidden size, C = chunk tokens, M = ceil(N / C) chunks.
Cost: one extra MLP forward per chunk in backward (the recompute); FLOPs otherwise unchanged. Under activation
checkpointing that recompute replaces the checkpoint's own re-run of the MLP (see ``_keep_input_for_backward``).
Memory: M generator states besides X (the CPU one's 5 KB each, plus 16 bytes for a CUDA input).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch.autograd.function import FunctionCtx

from .recompute import ChunkRNGStates, ParamGrads, autocast_state, chunk_count_over_ranks, zero3_partitioned

MLPFn = Callable[[torch.Tensor], torch.Tensor]


def _chunks(flat: torch.Tensor, chunk_tokens: int, n_chunks: int | None = None) -> list[torch.Tensor]:
    """Rows of ``flat`` in chunks of ``chunk_tokens``, then empty chunks up to ``n_chunks`` (ZeRO-3: every rank makes
    the same module calls, ``chunk_count_over_ranks``)."""
    pieces = list(flat.split(chunk_tokens))
    return pieces + [flat[:0]] * ((n_chunks or 0) - len(pieces))


def _map_chunks(fn: MLPFn, x: torch.Tensor, chunk_tokens: int, rng: ChunkRNGStates | None = None,
                n_chunks: int | None = None) -> torch.Tensor:
    """fn over chunks of ``chunk_tokens`` tokens of ``x`` (..., d), flattened over batch x seq (padded with empty
    chunks to ``n_chunks``); ``rng`` records each chunk's starting RNG state for the recompute."""
    flat = x.reshape(-1, x.shape[-1])  # (N, d)
    outs = []
    for c in _chunks(flat, chunk_tokens, n_chunks):
        if rng is not None:
            rng.capture()
        outs.append(fn(c))
        if rng is not None:
            rng.settle()
    out = torch.cat(outs, dim=0)
    return out.view(*x.shape[:-1], out.shape[-1])


def default_mlp_chunk_tokens(hidden_size: int) -> int:
    """C = 2d tokens: the paper's C = d made 2x coarser, 2-4% faster on CPU (experiments/table13_16) at the same
    full-size max length as C = d with and without gradient accumulation (Llama3-8B, traced planner); 4d was
    faster still but cost 7% of the length under gradient accumulation, where the MLP backward is the peak."""
    return 2 * hidden_size


def resolve_chunk_tokens(n_tokens: int, chunk_tokens: int | None = None, num_chunks: int | None = None,
                         default: int | None = None) -> int:
    """Tokens per chunk from either a token count or a chunk count M (no split when N <= C)."""
    if chunk_tokens is not None and num_chunks is not None:
        raise ValueError("give chunk_tokens or num_chunks, not both")
    if num_chunks is not None:
        if num_chunks <= 0:
            raise ValueError(f"num_chunks must be a positive integer, got {num_chunks}")
        return max(1, math.ceil(n_tokens / num_chunks))
    chunk = chunk_tokens if chunk_tokens is not None else default
    if chunk is None or chunk <= 0:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk}")
    return int(chunk)


class _SaveMLPInput(torch.autograd.Function):
    """Identity on ``x`` that saves it; see ``_keep_input_for_backward``."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        """Save ``x``; the view returned is what the MLP consumes, so this node comes before it in the graph."""
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """The gradient passes through to ``x``; the params get theirs from ``MiniSequenceMLPFunction``."""
        return (grad, *[None] * (len(ctx.needs_input_grad) - 1))


def _keep_input_for_backward(x: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``x`` through an identity node that saves it, *before* the MLP runs, for the mini-sequence MLP's backward;
    that node (the result's ``grad_fn``) is what ``MiniSequenceMLPFunction`` reads X from.

    Why a separate node in front, and not ``save_for_backward`` in the MLP's own Function: under non-reentrant
    activation checkpointing the layer's recompute stops as soon as every tensor saved in the forward is back
    (torch's early stop). Saved here, X is the MLP's last saved tensor in a Llama-style layer (the residual add
    after it saves nothing), so the recompute ends before the MLP and MsT + checkpointing runs the MLP forward twice
    per step, as checkpointing alone does, instead of three times. Where something after the MLP saves its output
    (Gemma-2's post-MLP norm) the recompute simply continues through the MLP: correct either way. It composes with
    DDP and FSDP because nothing here touches parameters behind autograd's back: ``params`` are declared as inputs
    of this node (so it exists whenever anything needs a gradient, even with a frozen ``x``) and of
    ``MiniSequenceMLPFunction`` (so autograd routes their gradients through it); the gradients are returned to
    autograd and never written to ``.grad``, so the gradient hooks those wrappers install (reduce-scatter,
    partitioned accumulation) fire as for the plain module. DeepSpeed ZeRO-3 parameters are the exception (empty
    partitions outside their module's forward, so they cannot be declared: see ``_zero3_backward``); for them
    ``params`` is empty here.
    """
    return _SaveMLPInput.apply(x, *params)


class MiniSequenceMLPFunction(torch.autograd.Function):
    """y = fn(x) computed chunk by chunk along the token axis; saves nothing itself (X is held by ``saver``, the
    ``_keep_input_for_backward`` node that produced ``x``), besides each chunk's RNG state for the recompute.

    ``params`` must be every tensor ``fn`` closes over that may need a gradient: they are declared as inputs so
    that autograd routes their gradients back through this node.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, saver: torch.autograd.graph.Node, fn: MLPFn, chunk_tokens: int,
                n_chunks: int, zero3_params: tuple[torch.Tensor, ...], *params: torch.Tensor) -> torch.Tensor:
        """Each chunk under no_grad (no intermediates kept), its RNG state recorded for the recompute."""
        ctx.saver, ctx.params, ctx.zero3_params = saver, params, zero3_params
        ctx.fn, ctx.chunk_tokens, ctx.n_chunks = fn, chunk_tokens, n_chunks
        ctx.autocast, ctx.rng = autocast_state(x.device.type), ChunkRNGStates(x)
        with torch.no_grad():  # detached so no chunk view claims to need grad
            return _map_chunks(fn, x.detach(), chunk_tokens, ctx.rng, n_chunks)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Recompute one chunk at a time (forward's RNG and autocast) and let autograd give its gradients."""
        (x,) = ctx.saver.saved_tensors
        want_x = ctx.needs_input_grad[0]
        param_grads = ParamGrads(ctx.params, ctx.needs_input_grad[6:])
        flat = x.detach().reshape(-1, x.shape[-1])
        gflat = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(flat) if want_x else None
        start = 0
        chunks = list(zip(*(_chunks(t, ctx.chunk_tokens, ctx.n_chunks) for t in (flat, gflat))))
        for i, (xc, gc) in enumerate(chunks):
            xc = xc.detach().requires_grad_(want_x)
            with ctx.rng.replay(i), torch.enable_grad(), torch.autocast(**ctx.autocast):
                yc = ctx.fn(xc)
            if ctx.zero3_params:
                _zero3_backward(yc, gc, xc, ctx.zero3_params, last=i == len(chunks) - 1)
                grad_xc = xc.grad
            else:
                inputs = ([xc] if want_x else []) + param_grads.wanted
                grads = torch.autograd.grad(yc, inputs, gc, allow_unused=True)
                grad_xc, grads = (grads[0], grads[1:]) if want_x else (None, grads)
                param_grads.add(grads)
            if want_x:
                grad_x[start:start + xc.shape[0]] = grad_xc
            start += xc.shape[0]
        gx = grad_x.view_as(x) if want_x else None
        return (gx, None, None, None, None, None, *param_grads.result())


def _zero3_backward(y: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, params: Sequence[torch.Tensor],
                    last: bool) -> None:
    """One recomputed chunk's backward for ZeRO-3 parameters, as DeepSpeed's own TiledMLP does it.

    A ZeRO-3 parameter is an empty partition except inside its module's forward (DeepSpeed gathers it there, also
    in this recompute), so it cannot be an input of ``MiniSequenceMLPFunction``: autograd would check the full
    gradient returned for it against the empty shape it had when the Function was applied. Instead each chunk's
    backward accumulates into ``.grad`` through autograd's own leaf accumulation, where ZeRO-3's hooks take it;
    ``ds_grad_is_ready`` (DeepSpeed's flag) defers its reduce-scatter to the last chunk's contribution."""
    for p in params:
        p.ds_grad_is_ready = last
    torch.autograd.backward(y, grad)
    if x.requires_grad and x.grad is None:  # the chunk's output does not depend on x (a constant fn)
        x.grad = torch.zeros_like(x)


def mini_sequence_mlp(x: torch.Tensor, fn: MLPFn, params: Sequence[torch.Tensor], chunk_tokens: int,
                      mode: str = "recompute") -> torch.Tensor:
    """Apply a token-wise ``fn`` to ``x`` (..., d) in chunks of ``chunk_tokens`` tokens.

    mode="recompute": exact MsT, saves only ``x`` (the default).
    mode="naive": the official code's plain loop under autograd (saves every chunk's intermediates); kept only to
    reproduce the paper's Table 15/16 numbers.
    No split when the token count is at most ``chunk_tokens``: then this is exactly ``fn(x)``.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens}")
    n_tokens = x.numel() // x.shape[-1] if x.numel() else 0
    n_chunks = chunk_count_over_ranks(-(-n_tokens // chunk_tokens), params)
    if n_chunks <= 1:
        return fn(x)
    if mode == "naive":
        return _map_chunks(fn, x, chunk_tokens, n_chunks=n_chunks)
    if mode != "recompute":
        raise ValueError(f"mode must be 'recompute' or 'naive', got {mode!r}")
    zero3 = zero3_partitioned(params)  # then n_chunks is the largest count over the ranks
    kept = _keep_input_for_backward(x, () if zero3 else params) if torch.is_grad_enabled() else x
    if kept.grad_fn is None:
        if zero3 and torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return fn(x)  # a frozen input with ZeRO-3 parameters: no node to keep X on, so the plain module
        with torch.no_grad():  # nothing needs a gradient: no graph, no recompute
            return _map_chunks(fn, x.detach(), chunk_tokens, n_chunks=n_chunks)
    if zero3:  # their gradients go to .grad inside backward (_zero3_backward)
        return MiniSequenceMLPFunction.apply(kept, kept.grad_fn, fn, chunk_tokens, n_chunks, tuple(params))
    return MiniSequenceMLPFunction.apply(kept, kept.grad_fn, fn, chunk_tokens, n_chunks, (), *params)
