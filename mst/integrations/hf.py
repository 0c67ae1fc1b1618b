"""One call, ``mst.apply(model)``, turns an HF ``*ForCausalLM`` into an exact Mini-Sequence Transformer.

What it changes, in place (idempotent; ``mst.revert`` undoes it):
1. every decoder layer's MLP ``forward`` runs through ``mini_sequence_mlp`` (saves only its input); with
   ``norms=True`` its hidden-state norms too;
2. the model's ``forward``: with ``labels``, the decoder runs as usual but the LM-head + loss run through
   ``chunked_lm_head_loss`` and the returned ``logits`` is ``None`` (the point is never to build S x V logits);
   a head that is not a plain ``nn.Linear`` (a LoRA adapter, a custom forward, a hook) runs itself, chunk by chunk,
   through ``chunked_module_lm_head_loss``, so whatever the unpatched model computes is what mst computes;
   without labels the original forward runs untouched, so ``generate()`` and evaluation see normal logits;
3. activation checkpointing of every decoder layer (HF's non-reentrant checkpoint), optionally with the
   checkpointed layer inputs offloaded to CPU (``mst.integrations.offload``); ``revert`` restores the user's own state.

Why hook this way: we call the model's own forward with ``logits_to_keep`` = an empty index, so HF computes
logits for zero positions (no memory) while a forward hook on the decoder hands us the final hidden states. No
family's forward is copied, so attention masks, rotary embeddings, kwargs and future HF changes stay HF's.

Each patched forward is a small object stored on the module it patches and holding that module (``_MiniSequenceForward``,
``_CausalLMForward``), not a closure: ``copy.deepcopy`` (TRL's reference model, EMA copies) maps it to the copy's
own module, and ``torch.save`` / pickle store it with the model. ``torch.compile`` wrappers are patched through to
the module they compile; multimodal ``*ForConditionalGeneration`` models through their text config and language
model. A family outside ``FAMILIES`` is checked at apply time against the model's own loss (``_check_exact``).
"""
from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.utils.generic import TransformersKwargs

from ..ops import (ATTENTION_BACKENDS, TokenStats, chunked_lm_head_loss, chunked_module_lm_head_loss,
                   default_mlp_chunk_tokens, mini_sequence_mlp, resolve_chunk_tokens)
from ..ops.lm_head_common import LMHeadSpec, check_class_weights
from .attention import BACKEND_ATTR, CHUNK_ATTR, MINI_SEQUENCE_ATTENTION
from .families import FAMILIES, Family, family_of, text_config
from .offload import offloading_checkpoint

PROBE_TOKENS = 8  # tokens of the apply-time exactness check of families outside the table
# keyword arguments every HF causal LM's forward takes through **kwargs, besides its named parameters; any other
# keyword belongs to a wrapper installed on the instance before ``apply`` (see ``_Patch``)
HF_KWARGS = set(TransformersKwargs.__annotations__) | {"return_dict", "shift_labels", "ignore_index"}


@dataclass(frozen=True)
class MsTOptions:
    """Options of ``mst.apply`` (see its docstring); stored on the model as ``model.mst_options``."""

    mlp: bool = True
    lm_head: bool = True
    mlp_chunk_tokens: int | None = None  # default: 2d tokens (paper: C = d; see default_mlp_chunk_tokens)
    mlp_chunks: int | None = None  # alternative: fixed number of mini-sequences M
    mlp_mode: str = "recompute"  # or "naive" (the official plain loop, for Table 15/16)
    norms: bool = False  # the hidden-state norms (every layer's, the final one) in mini-sequences (MLP's chunk size)
    lm_head_chunk_tokens: int | None = None
    lm_head_chunks: int | None = None  # default: ceil(V / d), at least d / 4 tokens each
    lm_head_logits_budget_bytes: int | None = None
    lm_head_weight_grad_block_rows: int | None = None  # None: V x d fp32 accumulator filled in the forward
    checkpointing: bool = True
    offload_checkpoints: bool = False
    eval_logits: bool = False  # with labels but no gradient (evaluation): the unpatched forward, logits included
    attention: bool = False  # core attention by query chunks (mst.ops.mini_sequence_attention)
    attention_chunk_tokens: int | None = None  # default: the op's (head_dim queries on CPU, 8192 on CUDA)
    attention_backend: str = "auto"  # the op's: "auto" (sdpa on CUDA without softcap, else math), "math", "sdpa"
    token_stats: bool = False  # with labels: output.token_stats (each token's lse and argmax; mst.ops.TokenStats)
    label_smoothing: float | int = 0.0  # the training loss's, as F.cross_entropy's (HF's loss has none)
    z_loss: float | int = 0.0  # adds z_loss x logsumexp(logits)^2 per valid token (Liger's lse_square_scale)
    class_weights: torch.Tensor | None = None  # (V,) per-class weights, as F.cross_entropy(weight=)

    def __post_init__(self) -> None:
        """Type-check every field against its annotation: ``bool`` is an ``int`` subclass and any non-empty string
        is truthy, so ``mlp_chunk_tokens=True`` or ``checkpointing="no"`` would otherwise pass as other options."""
        for name, hint in typing.get_type_hints(MsTOptions).items():
            value = getattr(self, name)
            allowed = typing.get_args(hint) or (hint,)  # `int | None` -> (int, NoneType)
            if not any(isinstance(value, t) and (t is bool or not isinstance(value, bool)) for t in allowed):
                names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
                raise TypeError(f"mst.apply: {name} must be {names}, got {value!r} ({type(value).__name__})")


class _Patch:
    """A patched ``forward`` stored on ``module``; ``__wrapped__`` is the class forward it replaces, so
    ``inspect.signature`` (used by HF's Trainer and ``generate``) sees the original parameters.

    A forward already set on the instance (TRL's fused LM head, accelerate's autocast wrapper) is kept as ``inner``:
    the patch runs it where it would run the class forward, and ``revert`` puts it back."""

    def __init__(self, module: nn.Module, opts: MsTOptions):
        self.module, self.opts = module, opts
        self.inner: Callable | None = module.__dict__.get("forward")

    @property
    def __wrapped__(self) -> Callable:
        return type(self.module).forward.__get__(self.module)

    def original(self, *args, **kwargs):
        """The instance forward that was there before, else the class forward called as a plain function: under
        ``torch.compile`` a bound ``module.forward`` is looked up again by attribute, which would find this patch
        and recurse."""
        if self.inner is not None:
            return self.inner(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)


class _MiniSequenceForward(_Patch):
    """A token-wise module run through ``mini_sequence_mlp``: each decoder layer's MLP, and with ``norms=True`` its
    hidden-state norms. Chunks of the MLP's mini-sequence size (default 2d tokens, d = the input width); a norm
    always recomputes (``mlp_mode`` is the MLP's)."""

    def __init__(self, module: nn.Module, opts: MsTOptions, mode: str = "recompute"):
        super().__init__(module, opts)
        self.mode = mode

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n_tokens = x.numel() // x.shape[-1] if x.numel() else 0
        chunk = resolve_chunk_tokens(n_tokens, self.opts.mlp_chunk_tokens, self.opts.mlp_chunks,
                                     default=default_mlp_chunk_tokens(x.shape[-1]))
        return mini_sequence_mlp(x, self.original, [p for p in self.module.parameters() if p.requires_grad],
                                 chunk, mode=self.mode)


def _hidden_state_norms(parent: nn.Module) -> list[nn.Module]:
    """The norms a decoder layer (or the decoder, its final norm) applies to the hidden state: its direct children
    that are a LayerNorm or an RMSNorm (HF names its own *RMSNorm / *LayerNorm in every family). Each normalises
    over the last dim only, so it is token-wise; q/k norms sit inside the attention module and stay as they are."""
    return [m for m in parent.children() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))
            or type(m).__name__.endswith(("RMSNorm", "LayerNorm"))]


class _CausalLMForward(_Patch):
    """The model's forward; with labels, its LM head + loss by chunks of tokens (``logits`` = None)."""

    def __init__(self, module: nn.Module, opts: MsTOptions, family: Family):
        super().__init__(module, opts)
        self.family = family
        params = inspect.signature(type(module).forward).parameters
        self.positional = [name for name, p in params.items()
                           if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][1:]  # without `self`
        self.known = set(params) | HF_KWARGS

    def __call__(self, *args, **kwargs):
        if self.inner is not None and not kwargs.keys() <= self.known:
            # an argument of the wrapper's own (TRL's fused_lm_head=True): the wrapper's feature, run as it is
            return self.inner(*args, **kwargs)
        model, original, opts = self.module, self.original, self.opts
        kwargs.update(zip(self.positional, args))  # bind positionals by name so `labels` is found wherever passed
        if opts.eval_logits and not torch.is_grad_enabled():  # evaluation: HF's own loss and logits
            return original(**kwargs)
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
        hook = decoder(model).register_forward_hook(
            lambda mod, inp, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else
                                                       out.last_hidden_state))
        try:
            # HF computes logits for no position
            kwargs["logits_to_keep"] = torch.empty(0, dtype=torch.long, device=model.lm_head.weight.device)
            out = original(**kwargs, return_dict=True)
        finally:
            hook.remove()
        hidden = captured["h"]
        if shift_labels is None:  # same shift as HF's ForCausalLMLoss: along the labels' last dim, tokens < n predict n
            shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        if shift_labels.numel() != hidden.shape[:-1].numel():
            raise ValueError(f"mst: labels of shape {tuple(shift_labels.shape)} do not match the "
                             f"{tuple(hidden.shape[:-1])} tokens of the input")
        cfg = text_config(model.config)  # read per call: a config edited after apply is honoured, as by HF
        softcap = getattr(cfg, self.family.softcap_attr, None) if self.family.softcap_attr else None
        logit_scale = getattr(cfg, self.family.logit_scale_attr, None) if self.family.logit_scale_attr else None
        if self.family.logit_divisor_attr and getattr(cfg, self.family.logit_divisor_attr, None) is not None:
            logit_scale = 1.0 / getattr(cfg, self.family.logit_divisor_attr)
        head = model.lm_head  # read per call: PEFT may replace it after apply
        labels = shift_labels.reshape(hidden.shape[:-1]).to(hidden.device)  # HF flattens both
        stats = TokenStats() if opts.token_stats else None
        common = dict(chunk_tokens=opts.lm_head_chunk_tokens, num_chunks=opts.lm_head_chunks,
                      logits_budget_bytes=opts.lm_head_logits_budget_bytes, ignore_index=ignore_index,
                      num_items_in_batch=num_items, logit_scale=logit_scale, final_logit_softcapping=softcap,
                      token_stats=stats, label_smoothing=float(opts.label_smoothing), z_loss=float(opts.z_loss),
                      class_weights=opts.class_weights)
        if _head_is_plain(head):  # the fast path: gradients formed in the forward from the weight itself
            loss = chunked_lm_head_loss(hidden, head.weight, labels, bias=head.bias,
                                        weight_grad_block_rows=opts.lm_head_weight_grad_block_rows, **common)
        else:  # LoRA, a custom forward or a hook: run the module itself, chunk by chunk, recomputed in backward
            loss = chunked_module_lm_head_loss(hidden, head, [p for p in head.parameters() if p.requires_grad],
                                               labels, vocab_size=head.weight.shape[0], **common)
        # rebuilt rather than assigned: a ModelOutput keeps keys in creation order and ignores `= None`, so this is
        # the only way to get HF's layout (loss first for out[0] / to_tuple(), no empty logits left behind)
        result = type(out)(**{**{k: v for k, v in out.items() if k != "logits"}, "loss": loss})
        if stats is not None:  # an attribute, not a key: to_tuple() and HF's layout stay as they are
            result.token_stats = stats
        return result if return_dict else result.to_tuple()


def _head_is_plain(head: nn.Module) -> bool:
    """True when calling ``head`` is exactly ``x @ head.weight.T + head.bias``, which the weight-based chunked loss
    reproduces: no subclass or instance forward (LoRA, quantized layers) and no hook of its own. Global module hooks
    are not looked at: they are observers (torch's ModTracker / MemTracker, profilers), and treating them as part
    of the head would move every measured run onto the slower module path."""
    hooks = (head._forward_hooks, head._forward_pre_hooks, head._backward_hooks, head._backward_pre_hooks)
    return (isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward
            and "forward" not in head.__dict__ and not any(hooks))


def _unwrap(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile`` wrapper compiles (its forward calls that module, which carries the patch)."""
    while isinstance(getattr(model, "_orig_mod", None), nn.Module):
        model = model._orig_mod
    return model


def decoder(model: nn.Module) -> nn.Module | None:
    """The model's decoder (``get_decoder()``), or its ``.model`` where ``get_decoder()`` returns the model itself
    (transformers 5.x's ``MllamaForCausalLM``, whose decoder sits at ``.model``)."""
    found = model.get_decoder() if hasattr(model, "get_decoder") else None
    inner = getattr(model, "model", None)
    if found is model and isinstance(inner, nn.Module) and hasattr(inner, "layers"):
        return inner
    return found


def _decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    return getattr(decoder(model), "layers", None)


def _checkpointable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules HF checkpoints: those carrying a ``gradient_checkpointing`` flag."""
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "gradient_checkpointing")]


def _validate(model: nn.Module, opts: MsTOptions) -> tuple[Family, nn.ModuleList]:
    if not hasattr(model, "config") or not hasattr(model, "get_decoder") or not hasattr(model, "lm_head"):
        raise ValueError(f"mst.apply expects a Hugging Face *ForCausalLM (or *ForConditionalGeneration) model with "
                         f".lm_head and .get_decoder(); got {type(model).__name__} (for DDP / FSDP / PEFT wrappers, "
                         "apply it to the Hugging Face model inside, before wrapping)")
    layers = _decoder_layers(model)
    family = family_of(getattr(model.config, "model_type", "?"), layers, model.config)
    if layers is None:
        raise ValueError(f"mst.apply: {type(model).__name__} has no decoder layers at get_decoder().layers")
    for name in ("mlp_chunk_tokens", "mlp_chunks", "lm_head_chunk_tokens", "lm_head_chunks",
                 "lm_head_logits_budget_bytes", "lm_head_weight_grad_block_rows", "attention_chunk_tokens"):
        value = getattr(opts, name)
        if value is not None and value <= 0:
            raise ValueError(f"mst.apply: {name} must be a positive integer, got {value!r}")
    if opts.mlp_chunk_tokens is not None and opts.mlp_chunks is not None:
        raise ValueError("mst.apply: give mlp_chunk_tokens or mlp_chunks, not both")
    if sum(v is not None for v in (opts.lm_head_chunk_tokens, opts.lm_head_chunks,
                                   opts.lm_head_logits_budget_bytes)) > 1:
        raise ValueError("mst.apply: give at most one of lm_head_chunk_tokens, lm_head_chunks, "
                         "lm_head_logits_budget_bytes")
    if opts.attention_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"mst.apply: attention_backend must be one of {ATTENTION_BACKENDS}, got "
                         f"{opts.attention_backend!r}")
    if opts.mlp_mode not in ("recompute", "naive"):
        raise ValueError(f"mst.apply: mlp_mode must be 'recompute' or 'naive', got {opts.mlp_mode!r}")
    if opts.attention and (getattr(text_config(model.config), "attention_dropout", 0.0) or 0.0) > 0:
        raise ValueError("mst.apply: attention=True has no attention dropout, and the config sets attention_dropout="
                         f"{text_config(model.config).attention_dropout}; set it to 0 or pass attention=False")
    if opts.lm_head and getattr(model.lm_head, "weight", None) is None:
        raise ValueError("mst.apply: lm_head has no .weight (quantized or custom head?); pass lm_head=False")
    if (opts.label_smoothing or opts.z_loss or opts.class_weights is not None) and not opts.lm_head:
        raise ValueError("mst.apply: label_smoothing, z_loss and class_weights are options of mst's LM-head loss "
                         "(lm_head=True)")
    try:  # the loss's own checks (ranges, combinations), made at apply time
        LMHeadSpec(1, label_smoothing=opts.label_smoothing, z_loss=opts.z_loss, class_weights=opts.class_weights)
        if opts.class_weights is not None:
            check_class_weights(opts.class_weights, model.lm_head.weight.shape[0])
    except ValueError as exc:
        raise ValueError(f"mst.apply: {exc}") from None
    if opts.checkpointing and (not _checkpointable(model) or not getattr(model, "supports_gradient_checkpointing",
                                                                            True)):
        raise ValueError(f"mst.apply: {type(model).__name__} does not support activation checkpointing; "
                         "pass checkpointing=False")
    return family, layers


def _probe_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's eval-mode loss on ``ids`` (labels = ids), leaving no trace: RNG states, train/eval flags of every
    module and gradients are as before."""
    modes = [(m, m.training) for m in model.modules()]
    accelerators = sorted({p.device for p in model.parameters() if p.device.type not in ("cpu", "meta")}, key=str)
    device_type = accelerators[0].type if accelerators else None
    devices = [d.index or 0 for d in accelerators if d.type == device_type]
    try:
        with torch.random.fork_rng(devices=devices, device_type=device_type), torch.no_grad():
            return model.eval()(input_ids=ids, labels=ids, return_dict=True).loss.float()
    finally:
        for m, mode in modes:
            m.training = mode


def _probe_ids(model: nn.Module) -> torch.Tensor:
    """(1, PROBE_TOKENS) token ids spread over the vocabulary, avoiding every special token the configs name (an
    image token without an image would be refused by a multimodal forward)."""
    vocab = text_config(model.config).vocab_size
    keep = torch.ones(vocab, dtype=torch.bool)
    for cfg in (model.config, text_config(model.config)):
        for key, value in cfg.to_dict().items():
            if key.endswith(("_token_id", "_token_ids", "_token_index")):
                for token in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(token, int) and 0 <= token < vocab:
                        keep[token] = False
    allowed = keep.nonzero().squeeze(1)
    return allowed[torch.linspace(0, len(allowed) - 1, PROBE_TOKENS).long()][None].to(model.device)


def _check_exact(model: nn.Module, ids: torch.Tensor, expected: torch.Tensor) -> None:
    """ValueError unless the patched ``model`` gives the unpatched loss ``expected`` on ``ids`` (to rounding)."""
    actual = _probe_loss(model, ids)
    dtype = model.get_input_embeddings().weight.dtype
    rtol = max(1e-4, 4 * torch.finfo(dtype if dtype.is_floating_point else torch.bfloat16).eps)
    if not torch.isclose(actual, expected, rtol=rtol, atol=0, equal_nan=True):
        raise ValueError(
            f"mst.apply: model_type {model.config.model_type!r} is not in the supported families, and on a "
            f"{PROBE_TOKENS}-token check the patched model does not reproduce its own loss ({actual.item():.6g} vs "
            f"{expected.item():.6g}): its forward post-processes the hidden states or logits in a way MsT does not "
            f"know. The model is left unpatched. Supported families: {', '.join(sorted(FAMILIES))}.")


class _WhileRecording:
    """The ``gradient_checkpointing`` flag ``mst.apply`` sets: true only while autograd records.

    HF drops the KV cache of any forward in train mode while the flag is true, so ``generate()`` on a model left in
    ``train()`` produced wrong tokens after the first (as HF's own checkpointing does). A no-grad forward saves
    nothing for backward, so there is nothing to checkpoint: under ``no_grad`` / ``inference_mode`` the flag reads
    false and HF keeps the cache. A class at module level, so a patched model still pickles."""

    def __bool__(self) -> bool:
        return torch.is_grad_enabled()

    def __repr__(self) -> str:
        return "mst: True while autograd records"


def _enable_checkpointing(model: nn.Module, offload: bool) -> tuple[tuple[str, bool | None, Callable | None], ...]:
    """Turn on non-reentrant checkpointing (``_WhileRecording``) in every module HF checkpoints, and keep it on
    through HF's own enable (``_CheckpointingSetter``); return the modules' previous state as (name, flag,
    function), None for "not set on the instance", for ``revert``.

    Set directly rather than by HF's ``activation_checkpointing_enable``: that also hooks a local function on the
    input embeddings (needed by reentrant checkpointing only) which makes the model unpicklable and which its
    ``disable`` leaves in place."""
    before = tuple((name, m.__dict__.get("gradient_checkpointing"), m.__dict__.get("_gradient_checkpointing_func"))
                   for name, m in _checkpointable(model))
    model._set_gradient_checkpointing = _CheckpointingSetter(model, offload)
    model._set_gradient_checkpointing()
    return before


class _CheckpointingSetter:
    """Stands in for HF's ``_set_gradient_checkpointing`` on a patched model, so mst's checkpointing survives
    ``gradient_checkpointing_enable``: HF's Trainer and TRL call it when training starts (SFTConfig by default),
    and HF's setter would replace mst's checkpoint function (silently dropping ``offload_checkpoints``) and its
    ``_WhileRecording`` flag. Enabling (any arguments) keeps mst's non-reentrant checkpointing, which the
    mini-sequence MLP's early stop relies on; disabling is HF's. ``revert`` removes it."""

    def __init__(self, model: nn.Module, offload: bool):
        self.model, self.offload = model, offload

    def __call__(self, enable: bool = True, gradient_checkpointing_func: Callable | None = None, **kwargs) -> None:
        if not enable:
            type(self.model)._set_gradient_checkpointing(self.model, enable=False, **kwargs)
            return
        func = functools.partial(checkpoint, use_reentrant=False)
        if self.offload:
            func = offloading_checkpoint(func)
        for _, m in _checkpointable(self.model):
            m.gradient_checkpointing, m._gradient_checkpointing_func = _WhileRecording(), func


def _restore_checkpointing(model: nn.Module, before: tuple[tuple[str, bool | None, Callable | None], ...]) -> None:
    for name, flag, func in before:
        module = model.get_submodule(name)
        for attr, value in (("gradient_checkpointing", flag), ("_gradient_checkpointing_func", func)):
            if value is None:
                module.__dict__.pop(attr, None)
            else:
                setattr(module, attr, value)


def _remove_patches(model: nn.Module) -> None:
    """Take every patch off, putting back the instance forward it found (``_Patch.inner``), if any."""
    for module in model.modules():
        patch = module.__dict__.get("forward")
        if isinstance(patch, _Patch):
            if patch.inner is None:
                del module.forward
            else:
                module.forward = patch.inner


def _use_mini_sequence_attention(model: nn.Module, layers: nn.ModuleList, opts: MsTOptions) -> str:
    """Switch the (text) model's attention implementation to ``MINI_SEQUENCE_ATTENTION`` and give every layer's
    attention module its chunk size and backend; returns the implementation it replaced."""
    cfg = text_config(model.config)
    before = cfg._attn_implementation
    cfg._attn_implementation = MINI_SEQUENCE_ATTENTION
    for layer in layers:
        attention = getattr(layer, "self_attn", None)
        if attention is not None:
            setattr(attention, CHUNK_ATTR, opts.attention_chunk_tokens)
            setattr(attention, BACKEND_ATTR, opts.attention_backend)
    return before


def _restore_attention(model: nn.Module) -> None:
    """Undo ``_use_mini_sequence_attention`` (nothing if it was not used)."""
    before = model.__dict__.pop("_mst_attention_before", None)
    if before is None:
        return
    text_config(model.config)._attn_implementation = before
    for module in model.modules():
        module.__dict__.pop(CHUNK_ATTR, None)
        module.__dict__.pop(BACKEND_ATTR, None)


def _check_attention_change(model: nn.Module, previous: MsTOptions | None, opts: MsTOptions) -> None:
    """Sequence parallelism wraps the attention implementation the model had at its setup; switching it afterwards
    would silently run the model unsharded."""
    sp = getattr(model, "mst_sp", None)
    if sp is not None and sp.size > 1 and opts.attention != (previous is not None and previous.attention):
        raise ValueError("mst.apply: attention=True changes the model's attention implementation, which sequence "
                         "parallelism has already wrapped; call mst.apply before setup_sequence_parallel (or "
                         "teardown_sequence_parallel first)")


def revert(model: nn.Module) -> nn.Module:
    """Undo ``mst.apply``: restore class forwards, the attention implementation and the checkpointing state the
    model had before ``apply``."""
    target = _unwrap(model)
    if getattr(target, "mst_options", None) is not None:
        _check_attention_change(target, target.mst_options, replace(target.mst_options, attention=False))
        _revert(target)
    return model


def _revert(target: nn.Module) -> None:
    if getattr(target, "mst_options", None) is None:
        return
    _remove_patches(target)
    _restore_attention(target)
    target.__dict__.pop("_set_gradient_checkpointing", None)
    before = target.__dict__.pop("_mst_checkpointing_before", None)
    if before is not None:
        _restore_checkpointing(target, before)
    del target.mst_options


def apply(model: nn.Module, **options) -> nn.Module:
    """Make ``model`` (an HF ``*ForCausalLM``) a Mini-Sequence Transformer, in place; returns it.

    Options (all optional):
      mlp / lm_head (bool): patch the MLPs / the LM-head + loss (default both).
      mlp_chunk_tokens (int) or mlp_chunks (int): mini-sequence size of the MLP (default: 2d tokens,
          over batch x seq; no split when there are at most that many tokens).
      mlp_mode: "recompute" (exact MsT, default) or "naive" (the official plain loop, saves everything).
      norms (bool): also run the hidden-state norms (each layer's input / post-attention norms, Gemma's pre/post
          feed-forward ones, the decoder's final norm) in mini-sequences of the MLP's size, saving only their
          input: no full-sequence fp32 upcast is kept for backward (HF's RMSNorm saves an fp32 copy of its input
          and the normalised x).
      lm_head_chunk_tokens, lm_head_chunks or lm_head_logits_budget_bytes: LM-head chunking
          (default M = ceil(V / d) chunks of at least d / 4 tokens).
      lm_head_weight_grad_block_rows (int): make the LM head's weight gradient in backward, this many vocabulary
          rows at a time, instead of a V x d fp32 accumulator (-2.1 GB for Llama3-8B; one more logits matmul).
      checkpointing (bool): activation checkpointing of every decoder layer (default True; needs model.train()).
      offload_checkpoints (bool): keep the checkpointed layer inputs on CPU between forward and backward.
      attention (bool): also run the core attention of every layer by query chunks (``mini_sequence_attention``):
          exact, no S x S scores, no repeated K/V; saves Q, K, V and recomputes each chunk in backward. Sets the
          model's attention implementation to "mst_mini_sequence" (SDPA's masks; ``revert`` restores it); call it
          before ``setup_sequence_parallel``. No attention dropout, sinks or position bias (a clear error).
      attention_chunk_tokens (int): queries per attention chunk (default: head_dim queries on CPU, so a chunk's
          fp32 scores are Q-sized; 8192 through SDPA's flash kernel on CUDA).
      attention_backend: "auto" (SDPA per chunk on CUDA unless the model softcaps attention, else the fp32 math
          path), "math" or "sdpa" (see ``mst.ops.mini_sequence_attention``).
      eval_logits (bool): a call with labels but no gradient (``Trainer.evaluate``, ``torch.no_grad()``) runs the
          unpatched forward, so it returns HF's loss *and* the logits ``compute_metrics`` needs (S x V logits, in
          evaluation only; default False: logits=None whenever labels are given).
      token_stats (bool): with labels, the output also carries ``token_stats`` (``mst.ops.TokenStats``: each
          token's log-sum-exp and argmax prediction, recorded by the chunked loss, no S x V logits; its
          ``accuracy(shift_labels)`` is TRL's token accuracy). Per-token log-probs of the labels with gradients:
          ``mst.ops.chunked_lm_head_loss(..., reduction="none")``.
      label_smoothing (float in [0, 1]), z_loss (float >= 0): train on the label-smoothed cross-entropy (as
          ``F.cross_entropy``'s) plus z_loss x logsumexp(logits)^2 per valid token (Liger-Kernel's
          ``lse_square_scale``), reduced as HF's loss; the z-loss term alone, for logging:
          ``output.token_stats.z_loss(shift_labels)`` (with ``token_stats=True``).
          HF's own loss has neither, so the apply-time check of a family outside the table runs without them.
      class_weights (tensor of shape (V,)): per-class weights of the loss, as ``F.cross_entropy(weight=)`` (a mean
          divides by the valid labels' summed weights; HF's ``num_items_in_batch``, when given, still divides).
    A wrong type (``checkpointing="no"``, ``mlp_chunk_tokens=True``) raises TypeError.

    With labels, ``model(...)`` returns the exact loss and ``logits=None``; without labels, normal logits.
    Pre-shifted ``shift_labels=`` alone also yields the loss (unlike HF, which then computes none): sequence
    parallelism shifts labels before sharding and passes only those.
    ``model`` may be a ``torch.compile`` wrapper (the compiled module is patched; the wrapper is returned) or a
    multimodal ``*ForConditionalGeneration`` (its language model is patched, the vision tower is not).
    A ``model_type`` outside ``FAMILIES`` is checked on a few tokens against its own loss; a mismatch raises
    ValueError and leaves the model as it was. Calling apply again replaces the options (it never stacks patches).
    """
    unknown = set(options) - set(MsTOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"mst.apply: unknown option(s) {sorted(unknown)}; valid: "
                        f"{sorted(MsTOptions.__dataclass_fields__)}")
    opts = MsTOptions(**options)
    target = _unwrap(model)
    family, layers = _validate(target, opts)
    previous = getattr(target, "mst_options", None)
    _check_attention_change(target, previous, opts)
    _revert(target)
    check = ((opts.mlp or opts.lm_head or opts.norms or opts.attention)
             and getattr(target.config, "model_type", None) not in FAMILIES)
    if check:
        ids = _probe_ids(target)
        expected = _probe_loss(target, ids)
    if opts.mlp:
        for layer in layers:
            mlp = getattr(layer, family.mlp_attr)
            mlp.forward = _MiniSequenceForward(mlp, opts, opts.mlp_mode)
    if opts.norms:
        for parent in (*layers, decoder(target)):  # the decoder's own: the final norm
            for norm in _hidden_state_norms(parent):
                norm.forward = _MiniSequenceForward(norm, opts)
    if opts.attention:
        target._mst_attention_before = _use_mini_sequence_attention(target, layers, opts)
    if opts.lm_head:  # checked (below) as HF's loss: eval_logits off (mst's own loss runs), no loss features
        as_hf = replace(opts, eval_logits=False, label_smoothing=0.0, z_loss=0.0, class_weights=None)
        target.forward = _CausalLMForward(target, as_hf, family)
    if check:
        try:
            _check_exact(target, ids, expected)
        except ValueError:
            _remove_patches(target)
            _restore_attention(target)
            if previous is not None:  # a re-apply that fails keeps the patch the model had
                apply(target, **asdict(previous))
            raise
    if opts.lm_head:
        target.forward.opts = opts
    if opts.checkpointing:
        target._mst_checkpointing_before = _enable_checkpointing(target, opts.offload_checkpoints)
    target.mst_options = opts
    return model


def options_dict(model: nn.Module) -> dict:
    """The options ``mst.apply`` was called with (for logging), or {} for an unpatched model."""
    opts = getattr(_unwrap(model), "mst_options", None)
    return asdict(opts) if opts is not None else {}
