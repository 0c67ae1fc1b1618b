"""One call, ``mst.apply(model)``, turns an HF ``*ForCausalLM`` into an exact Mini-Sequence Transformer.

What it changes, in place (idempotent; ``mst.revert`` undoes it):
1. every decoder layer's MLP ``forward`` runs through ``mini_sequence_mlp`` (saves only its input);
2. the model's ``forward``: with ``labels``, the decoder runs as usual but the LM-head + loss run through
   ``chunked_lm_head_loss`` and the returned ``logits`` is ``None`` (the point is never to build S x V logits);
   without labels the original forward runs untouched, so ``generate()`` and evaluation see normal logits;
3. activation checkpointing of every decoder layer (HF's non-reentrant checkpoint), optionally with the
   checkpointed layer inputs offloaded to CPU (``mst.memory.offload``).

Why hook this way: we call the model's own forward with ``logits_to_keep`` = an empty index, so HF computes
logits for zero positions (no memory) while a forward hook on the decoder hands us the final hidden states. No
family's forward is copied, so attention masks, rotary embeddings, kwargs and future HF changes stay HF's.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..ops import chunked_lm_head_loss, default_mlp_chunk_tokens, mini_sequence_mlp, resolve_chunk_tokens
from .families import Family, family_of


@dataclass(frozen=True)
class MsTOptions:
    """Options of ``mst.apply`` (see its docstring); stored on the model as ``model.mst_options``."""

    mlp: bool = True
    lm_head: bool = True
    mlp_chunk_tokens: int | None = None  # default: 2d tokens (paper: C = d; see default_mlp_chunk_tokens)
    mlp_chunks: int | None = None  # alternative: fixed number of mini-sequences M
    mlp_mode: str = "recompute"  # or "naive" (the official plain loop, for Table 15/16)
    lm_head_chunk_tokens: int | None = None
    lm_head_chunks: int | None = None  # default: ceil(V / d), at least d / 4 tokens each
    lm_head_logits_budget_bytes: int | None = None
    lm_head_weight_grad_block_rows: int | None = None  # None: V x d fp32 accumulator filled in the forward
    checkpointing: bool = True
    offload_checkpoints: bool = False


def _decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return getattr(decoder, "layers", None)


def _validate(model: nn.Module, opts: MsTOptions) -> tuple[Family, nn.ModuleList]:
    if not hasattr(model, "config") or not hasattr(model, "get_decoder") or not hasattr(model, "lm_head"):
        raise ValueError(f"mst.apply expects a Hugging Face *ForCausalLM model with .lm_head and .get_decoder(); "
                         f"got {type(model).__name__}")
    layers = _decoder_layers(model)
    family = family_of(getattr(model.config, "model_type", "?"), layers, model.config)
    if layers is None:
        raise ValueError(f"mst.apply: {type(model).__name__} has no decoder layers at get_decoder().layers")
    for name in ("mlp_chunk_tokens", "mlp_chunks", "lm_head_chunk_tokens", "lm_head_chunks",
                 "lm_head_logits_budget_bytes", "lm_head_weight_grad_block_rows"):
        value = getattr(opts, name)
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"mst.apply: {name} must be a positive integer, got {value!r}")
    if opts.mlp_chunk_tokens is not None and opts.mlp_chunks is not None:
        raise ValueError("mst.apply: give mlp_chunk_tokens or mlp_chunks, not both")
    if sum(v is not None for v in (opts.lm_head_chunk_tokens, opts.lm_head_chunks,
                                   opts.lm_head_logits_budget_bytes)) > 1:
        raise ValueError("mst.apply: give at most one of lm_head_chunk_tokens, lm_head_chunks, "
                         "lm_head_logits_budget_bytes")
    if opts.mlp_mode not in ("recompute", "naive"):
        raise ValueError(f"mst.apply: mlp_mode must be 'recompute' or 'naive', got {opts.mlp_mode!r}")
    if opts.lm_head and getattr(model.lm_head, "weight", None) is None:
        raise ValueError("mst.apply: lm_head has no .weight (quantized or custom head?); pass lm_head=False")
    return family, layers


def _patch_mlp(mlp: nn.Module, hidden_size: int, opts: MsTOptions) -> None:
    original = type(mlp).forward.__get__(mlp)  # the class forward: revert is `del mlp.forward`

    def token_fn(x: torch.Tensor) -> torch.Tensor:
        return original(x)

    @functools.wraps(original)
    def forward(x: torch.Tensor) -> torch.Tensor:
        n_tokens = x.numel() // x.shape[-1] if x.numel() else 0
        chunk = resolve_chunk_tokens(n_tokens, opts.mlp_chunk_tokens, opts.mlp_chunks, default=default_mlp_chunk_tokens(hidden_size))
        return mini_sequence_mlp(x, token_fn, [p for p in mlp.parameters() if p.requires_grad], chunk,
                                 mode=opts.mlp_mode)

    forward._mst_patched = True
    mlp.forward = forward


def _patch_causal_lm(model: nn.Module, family: Family, opts: MsTOptions) -> None:
    original = type(model).forward.__get__(model)
    cfg = model.config
    softcap = getattr(cfg, family.softcap_attr, None) if family.softcap_attr else None
    logit_scale = getattr(cfg, family.logit_scale_attr, None) if family.logit_scale_attr else None

    positional = [name for name, p in inspect.signature(original).parameters.items()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    @functools.wraps(original)
    def forward(*args, **kwargs):
        kwargs.update(zip(positional, args))  # bind positionals by name so `labels` is found wherever passed
        labels = kwargs.pop("labels", None)
        shift_labels = kwargs.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            return original(**kwargs)
        num_items = kwargs.get("num_items_in_batch")
        ignore_index = kwargs.pop("ignore_index", -100)
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(model.config, "return_dict", True)
        captured = {}
        hook = model.get_decoder().register_forward_hook(
            lambda mod, inp, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else
                                                       out.last_hidden_state))
        try:
            # HF computes logits for no position
            kwargs["logits_to_keep"] = torch.empty(0, dtype=torch.long, device=model.lm_head.weight.device)
            out = original(**kwargs, return_dict=True)
        finally:
            hook.remove()
        hidden = captured["h"]
        if shift_labels is None:  # same shift as HF's ForCausalLMLoss: tokens < n predict n
            shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        head = model.lm_head
        loss = chunked_lm_head_loss(
            hidden, head.weight, shift_labels.to(hidden.device), bias=getattr(head, "bias", None),
            chunk_tokens=opts.lm_head_chunk_tokens, num_chunks=opts.lm_head_chunks,
            logits_budget_bytes=opts.lm_head_logits_budget_bytes, ignore_index=ignore_index,
            weight_grad_block_rows=opts.lm_head_weight_grad_block_rows,
            num_items_in_batch=num_items, logit_scale=logit_scale, final_logit_softcapping=softcap)
        # rebuilt rather than assigned: a ModelOutput keeps keys in creation order and ignores `= None`, so this is
        # the only way to get HF's layout (loss first for out[0] / to_tuple(), no empty logits left behind)
        result = type(out)(**{**{k: v for k, v in out.items() if k != "logits"}, "loss": loss})
        return result if return_dict else result.to_tuple()

    forward._mst_patched = True
    model.forward = forward


def _enable_checkpointing(model: nn.Module, offload: bool) -> None:
    # transformers >= 5.2x renamed the method; 5.17 (the GPU image) only has the old name
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if offload:
        from ..memory.offload import offloading_checkpoint  # memory builds on integrations, imported lazily
        for module in model.modules():
            func = getattr(module, "_gradient_checkpointing_func", None)
            if func is not None and not getattr(func, "_mst_offload", False):
                module._gradient_checkpointing_func = offloading_checkpoint(func)


def revert(model: nn.Module) -> nn.Module:
    """Undo ``mst.apply``: restore class forwards and turn checkpointing off if apply turned it on."""
    opts = getattr(model, "mst_options", None)
    if opts is None:
        return model
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "_mst_patched", False):
            del module.forward
    if opts.checkpointing:
        getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
    del model.mst_options
    return model


def apply(model: nn.Module, **options) -> nn.Module:
    """Make ``model`` (an HF ``*ForCausalLM``) a Mini-Sequence Transformer, in place; returns it.

    Options (all optional):
      mlp / lm_head (bool): patch the MLPs / the LM-head + loss (default both).
      mlp_chunk_tokens (int) or mlp_chunks (int): mini-sequence size of the MLP (default: 2d tokens,
          over batch x seq; no split when there are at most that many tokens).
      mlp_mode: "recompute" (exact MsT, default) or "naive" (the official plain loop, saves everything).
      lm_head_chunk_tokens, lm_head_chunks or lm_head_logits_budget_bytes: LM-head chunking
          (default M = ceil(V / d) chunks of at least d / 4 tokens).
      lm_head_weight_grad_block_rows (int): make the LM head's weight gradient in backward, this many vocabulary
          rows at a time, instead of a V x d fp32 accumulator (-2.1 GB for Llama3-8B; one more logits matmul).
      checkpointing (bool): activation checkpointing of every decoder layer (default True; needs model.train()).
      offload_checkpoints (bool): keep the checkpointed layer inputs on CPU between forward and backward.

    With labels, ``model(...)`` returns the exact loss and ``logits=None``; without labels, normal logits.
    Pre-shifted ``shift_labels=`` alone also yields the loss (unlike HF, which then computes none): sequence
    parallelism shifts labels before sharding and passes only those.
    Calling apply again replaces the options (it never stacks patches).
    """
    unknown = set(options) - set(MsTOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"mst.apply: unknown option(s) {sorted(unknown)}; valid: "
                        f"{sorted(MsTOptions.__dataclass_fields__)}")
    opts = MsTOptions(**options)
    family, layers = _validate(model, opts)
    revert(model)
    hidden_size = model.config.hidden_size
    if opts.mlp:
        for layer in layers:
            _patch_mlp(getattr(layer, family.mlp_attr), hidden_size, opts)
    if opts.lm_head:
        _patch_causal_lm(model, family, opts)
    if opts.checkpointing:
        _enable_checkpointing(model, opts.offload_checkpoints)
    model.mst_options = opts
    return model


def options_dict(model: nn.Module) -> dict:
    """The options ``mst.apply`` was called with (for logging), or {} for an unpatched model."""
    opts = getattr(model, "mst_options", None)
    return asdict(opts) if opts is not None else {}
