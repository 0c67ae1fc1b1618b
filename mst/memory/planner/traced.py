"""Traced engine: run the real HF module code (with the real ``mst`` patches) on fake tensors and count bytes.

Nothing is allocated: the model is built on ``meta`` and materialised as fake *cpu* tensors inside
``FakeTensorMode`` (docs/environment.md §7: fake ``cuda`` aborts a CPU-only torch; ``meta`` makes SDPA take the math
path and materialise S x S scores, while fake cpu dispatches to the flash kernel, memory-equivalent to FlashAttention
on a GPU). A dispatch mode (``LiveBytes``, ``mst.memory.live_bytes``) counts the bytes of every tensor storage an op
creates until that storage dies, the quantity ``torch.distributed._tools.mem_tracker.MemTracker`` reports, with the
peak between marks.

Two short traces per strategy and length, then ``compose`` adds weights, gradients and optimizer state:
1. one decoder layer, forward then backward from a gradient on its output (checkpointed for ac/mst, so the
   backward includes the recompute; MsT's mini-sequence MLP for mst) -> ``LayerProfile``;
2. the model with zero decoder layers, forward with labels and backward: embedding, rotary cos/sin, final norm and
   the LM head + loss (HF's for vanilla/ac, MsT's chunked one for mst) -> ``HeadProfile``.
So a Llama3-8B plan at 60K tokens costs two small traces, not a 32-layer model on 2 CPU cores.

What it cannot see: kernel-internal workspaces (FlashAttention's backward accumulators, cuBLAS), the CUDA context,
and caching-allocator rounding/fragmentation (use the ``reserve_gb`` margin of ``max_seq_len``).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect

import torch

from transformers import PretrainedConfig

from ...integrations.attention import MINI_SEQUENCE_ATTENTION, attention_forward
from ...ops.mini_sequence_attention import traced_as_cuda
from ..live_bytes import LiveBytes
from ..strategies import prepare
from .compose import HeadProfile, LayerProfile
from .spec import ModelSpec, Workload


def _mark_once(marks: dict, name: str, tracker: LiveBytes) -> None:
    """Gradient hook: close a window the first time the gradient of a watched tensor is computed."""
    if name not in marks:
        marks[name] = tracker.mark()


CAUSAL_ATTENTION = "mst_causal"  # HF's SDPA function under a name HF builds no mask for (no "sdpa" in it)


def causal_attention() -> str:
    """Register (once) and return an HF attention implementation that is SDPA with ``is_causal`` and no mask.

    Why: the paper trained with FlashAttention-2 (O(S) memory, sliding windows and Gemma-2's attention softcap
    handled inside the kernel). transformers 5.x has no SDPA path for Gemma-2 (eager materialises S x S scores),
    and on value-less fake tensors it cannot prove a batch is unpacked, so it would build an S x S mask. Under this
    name HF skips mask construction and SDPA dispatches to its flash kernel: memory-equivalent to FA2, but without
    sliding windows or attention softcapping, so use it for memory work, not to train Gemma-2.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(CAUSAL_ATTENTION, sdpa_attention_forward)
    return CAUSAL_ATTENTION


CAUSAL_MINI_SEQUENCE_ATTENTION = "mst_mini_sequence_causal"  # mst's attention under a name HF builds no mask for


def causal_mini_sequence_attention() -> str:
    """Register (once) and return ``mst.apply(attention=True)``'s attention function under a name HF builds no mask
    for, as ``causal_attention`` does for SDPA: on fake tensors HF cannot prove a batch is unpadded and would build an
    S x S mask that a real unpadded batch never gets (its mask is None, causality comes from positions)."""
    from transformers import AttentionInterface

    AttentionInterface.register(CAUSAL_MINI_SEQUENCE_ATTENTION, attention_forward)
    return CAUSAL_MINI_SEQUENCE_ATTENTION


def flash_equivalent(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of ``config`` whose attention has a flash kernel's memory on any device: ``causal_attention()``, no
    attention softcap, no sliding windows (FlashAttention applies both inside the kernel, without S x S tensors).
    For memory work only (the planner, CPU emulations of GPU runs): the attention values differ from the model's."""
    cfg = copy.deepcopy(config)
    for name in ("sliding_window", "attn_logit_softcapping"):
        if hasattr(cfg, name):
            setattr(cfg, name, None)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = ["full_attention"] * max(cfg.num_hidden_layers, 1)
    cfg._attn_implementation = causal_attention()
    return cfg


def _step_in_backward(temporaries: int):
    """Post-accumulate-grad hook standing in for ``mst.memory.optimizer_in_backward``: the AdamW update's
    temporaries (2 for the for-loop, 1 for foreach), then the gradient is freed (``compose`` counts the state)."""

    def hook(param: torch.Tensor) -> None:
        scratch = [torch.empty_like(param) for _ in range(temporaries)]
        del scratch
        param.grad = None

    return hook


def _build(config: PretrainedConfig, num_layers: int, wl: Workload) -> torch.nn.Module:
    """The model with ``num_layers`` decoder layers on meta (build it outside ``FakeTensorMode``, then
    ``to_empty(device="cpu")`` inside), in training mode with the strategy applied.

    Attention is ``causal_attention()`` with no attention softcap; sliding windows are dropped (a flash kernel
    applies them without a mask, so they do not change memory). mst_offload is traced as mst: ``compose`` moves the
    checkpointed inputs to the host.
    """
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = num_layers
    cfg.use_cache = False
    cfg = flash_equivalent(cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=wl.dtype, attn_implementation=causal_attention())
    model = prepare(model, "mst" if wl.offload else wl.strategy, **dict(wl.mst_options))
    if model.config._attn_implementation == MINI_SEQUENCE_ATTENTION:  # mst.apply(attention=True)
        model.config._attn_implementation = causal_mini_sequence_attention()
    return model


def _materialize(model: torch.nn.Module, wl: Workload) -> torch.nn.Module:
    """Fake cpu parameters (inside ``FakeTensorMode``), re-tied embeddings, then the optimizer-in-backward hooks
    if planned (``to_empty`` swaps every parameter tensor: that unties a shared lm_head and drops earlier hooks)."""
    model = model.to_empty(device="cpu")
    if getattr(model.config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    if wl.optimizer == "adamw_in_backward" and not wl.grad_accumulation:
        hook = _step_in_backward(1 if wl.device == "cuda" else 2)  # torch's default: foreach on CUDA only
        for param in model.parameters():
            param.register_post_accumulate_grad_hook(hook)
    return model


def _layer_profile(model: torch.nn.Module, config: PretrainedConfig, wl: Workload) -> LayerProfile:
    decoder = model.get_decoder()
    layer, rotary = decoder.layers[0], decoder.rotary_emb
    x0 = torch.empty(wl.batch_size, wl.local_seq, config.hidden_size, dtype=wl.dtype, requires_grad=True)
    positions = torch.arange(wl.local_seq).unsqueeze(0)
    # shared by all layers: counted once, in the head trace; Gemma-3's tables are per layer type
    per_type = "layer_type" in inspect.signature(rotary.forward).parameters
    cos, sin = rotary(x0, positions, model.config.layer_types[0]) if per_type else rotary(x0, positions)
    grad_out = torch.empty_like(x0, requires_grad=False)
    tracker, marks = LiveBytes([*model.parameters(), *model.buffers(), x0, positions, cos, sin, grad_out]), {}
    with tracker:
        h = x0 * 1  # the layer input as a non-leaf, so it can die when nothing saves it
        h.register_hook(lambda g: _mark_once(marks, "bwd", tracker))
        tracker.mark()
        y = layer(h, position_embeddings=(cos, sin), attention_mask=None, position_ids=positions)
        out_bytes = y.untyped_storage().nbytes()
        del h
        marks["fwd"] = tracker.mark()
        root = (y * grad_out).sum()  # d root / d y = grad_out, and y itself is not kept
        del y
        root.backward()
    grads = [p.grad for p in layer.parameters()]
    return LayerProfile(saved=marks["fwd"].current - out_bytes, fwd_peak=marks["fwd"].peak,
                        bwd_peak=marks["bwd"].peak, bwd_peak_grads=tracker.bytes_of(marks["bwd"].peak_storages, grads),
                        offloadable=x0.numel() * wl.act_bytes if wl.checkpointed else 0,
                        bwd_peak_tensors=tuple(tracker.by_tensor(marks["bwd"].peak_storages)))


def _head_profile(model: torch.nn.Module, config: PretrainedConfig, wl: Workload) -> HeadProfile:
    ids = torch.zeros(wl.batch_size, wl.local_seq, dtype=torch.long)
    tracker, marks = LiveBytes([*model.parameters(), *model.buffers(), ids]), {}

    def on_norm(module, args):  # the last hidden state reaches the final norm: the head starts
        marks["head_start"] = tracker.mark()
        hidden = tracker.serials_of([args[0]])
        # what the layers share (position ids, rotary cos/sin) is alive now but dies with the decoder's forward
        # here (no layer saves it); count it once as `shared` and leave it out of the head's windows
        marks["shared"] = tracker.forget(marks["head_start"].alive - hidden)
        tracker.mark()
        args[0].register_hook(lambda g: _mark_once(marks, "head_bwd_end", tracker))

    handle = model.get_decoder().norm.register_forward_pre_hook(on_norm)
    try:
        with tracker:
            tracker.mark()
            loss = model(input_ids=ids, labels=ids).loss  # the output (and any logits) is released here
            marks["fwd_end"] = tracker.mark()
            loss.backward()
            marks["end"] = tracker.mark()
    finally:
        handle.remove()
    grads = [p.grad for p in model.parameters()]
    end, emb = marks["head_bwd_end"], marks["end"]
    return HeadProfile(shared=marks["shared"], fwd_peak=marks["fwd_end"].peak, saved=marks["fwd_end"].current,
                       bwd_peak=end.peak, bwd_peak_grads=tracker.bytes_of(end.peak_storages, grads),
                       bwd_end=end.current, bwd_end_grads=tracker.bytes_of(end.alive, grads),
                       embed_bwd_peak=emb.peak, embed_bwd_peak_grads=tracker.bytes_of(emb.peak_storages, grads))


def traced_profiles(config: PretrainedConfig, wl: Workload) -> tuple[LayerProfile, HeadProfile]:
    """Layer and head profiles of ``config`` under ``wl`` by fake tracing (see the module docstring)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    spec = ModelSpec.from_config(config)  # the same family table and checks as the analytic engine
    one_layer, no_layer = _build(config, 1, wl), _build(config, 0, wl)
    as_device = traced_as_cuda() if wl.device == "cuda" else contextlib.nullcontext()  # mst.apply(attention=True)
    with FakeTensorMode(allow_non_fake_inputs=True), as_device:
        one_layer, no_layer = _materialize(one_layer, wl), _materialize(no_layer, wl)
        layer, head = _layer_profile(one_layer, config, wl), _head_profile(no_layer, config, wl)
    if spec.rope_sets > 1:  # flash_equivalent made every layer full attention: the trace built one rotary table
        # (cos, sin) of the rope_sets the model builds (Gemma-3: local and global), all alive through the layers
        extra = (spec.rope_sets - 1) * 2 * wl.act_bytes * wl.local_seq * spec.rotary_dim
        head = dataclasses.replace(head, shared=head.shared + extra)
    return layer, head
