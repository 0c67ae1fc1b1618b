"""Per-model routing of HF's attention registry, the one piece of process-wide state sequence parallelism needs.

HF looks the core attention up by name in ``ALL_ATTENTION_FUNCTIONS`` on every call, and HF code branches on that
name elsewhere (mask creation, flash varlen), so, like DeepSpeed's ``register_with_transformers``, the entry of the
model's *own* implementation name is replaced instead of registering a new name. Unlike DeepSpeed it is replaced
with a router: only attention modules of a routed model (they carry ``_mst_sp_attention``) go through their
sequence-parallel attention, every other module in the process (e.g. an unsharded reference model) gets the
original function. This also keeps DeepSpeed's global sequence-parallel state untouched, so several models and
groups can coexist.

The router is there exactly while some live model is routed through it: ``route`` puts it in front of the first
model of an implementation name, ``unroute`` of the last one (or that model's garbage collection) puts the original
function back, so after teardown ``ALL_ATTENTION_FUNCTIONS`` is what it was before.
"""
from __future__ import annotations

import weakref
from typing import Callable

from torch import nn


class _Router:
    """Registry entry while models are routed: a module's own ``_mst_sp_attention`` if it has one, else
    ``original``."""

    def __init__(self, original: Callable) -> None:
        self.original = original

    def __call__(self, module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
        sp_attention = getattr(module, "_mst_sp_attention", None)
        if sp_attention is None:
            return self.original(module, query, key, value, attention_mask, *args, **kwargs)
        return sp_attention(module, query, key, value, attention_mask, *args, **kwargs)


# routed model -> (implementation name it was routed under, the finalizer that releases it if never unrouted);
# weak, so routing never keeps a model alive
_ROUTED: weakref.WeakKeyDictionary[nn.Module, tuple[str, weakref.finalize]] = weakref.WeakKeyDictionary()


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer (``get_decoder().layers[i].self_attn``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise ValueError(f"sequence parallelism expects an HF *ForCausalLM whose decoder layers have .self_attn; "
                         f"got {type(model).__name__}")
    return [layer.self_attn for layer in layers]


def route(model: nn.Module, make_attention: Callable[[Callable], Callable]) -> None:
    """Send every attention module of ``model`` through ``make_attention(core)``, where ``core`` is the registry's
    original function for the model's implementation name (replaces an earlier ``route`` of the same model)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    modules = attention_modules(model)
    unroute(model)
    impl = model.config._attn_implementation
    router = ALL_ATTENTION_FUNCTIONS[impl]
    if not isinstance(router, _Router):
        router = ALL_ATTENTION_FUNCTIONS[impl] = _Router(router)
    attention = make_attention(router.original)
    for module in modules:
        module._mst_sp_attention = attention  # a plain attribute: the attention objects are not nn.Modules
    release = weakref.finalize(model, _release, impl)
    release.atexit = False  # at interpreter exit the registry goes too
    _ROUTED[model] = (impl, release)


def unroute(model: nn.Module) -> None:
    """Undo ``route``: ``model``'s attention runs the original function; the last model out removes the router."""
    entry = _ROUTED.pop(model, None)
    if entry is None:
        return
    impl, release = entry
    for module in attention_modules(model):
        module.__dict__.pop("_mst_sp_attention", None)
    release.detach()
    _release(impl)


def _release(impl: str) -> None:
    """Put the original function back under ``impl`` unless a live model is still routed under it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    router = ALL_ATTENTION_FUNCTIONS.get(impl)
    if not isinstance(router, _Router) or any(name == impl for name, _ in _ROUTED.values()):
        return
    del ALL_ATTENTION_FUNCTIONS[impl]  # drops the override; HF's library-wide entry may be the original itself
    if ALL_ATTENTION_FUNCTIONS.get(impl) is not router.original:
        ALL_ATTENTION_FUNCTIONS[impl] = router.original
