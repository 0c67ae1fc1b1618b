"""Shared test helpers (importable as ``tests.utils``): tiny random HF causal LMs built offline, A/B comparison
helpers, and the memory probes.

Models: every family in ``mst.integrations.FAMILIES`` plus ``GENERIC_FAMILY`` (olmo2, outside the table) gets the
same tiny shape (d=32, I=64, 2 layers, 4 heads, 2 KV heads, V=101), so a forward+backward takes milliseconds on
CPU; V is prime and above d, so the default LM-head chunking (ceil(V/d) = 4 chunks, at least 8 tokens) rarely divides a token count.
Overrides go straight to the HF config.

    model = tiny_model("gemma2", final_logit_softcapping=0.5)        # tiny_config(...) for the config only
    ref, got = patched_pair("llama", {"mlp_mode": "naive"})          # identical weights, got = mst.apply(copy)
    ids = make_input_ids(2, 125); labels = make_labels(ids, "prefix")
    assert_same_step(ref, got, input_ids=ids, labels=labels)         # loss and every gradient equal

Also: ``GatedMLP`` (a plain SwiGLU/GeGLU module for op tests), ``assert_exact`` / ``assert_grads_close`` (the
fp32 equality used everywhere), ``rel_err``,
``MaxNumelMode`` (largest tensor any op allocates) and ``saved_tensor_bytes`` (what autograd keeps for backward).
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig,
                          PreTrainedModel)

import mst
from mst.integrations import FAMILIES

VOCAB = 101
HIDDEN = 32
INTERMEDIATE = 64
MLP_CHUNK = 16  # tokens per MLP mini-sequence in the integration tests, so 2-layer toy inputs are really split

BASE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)

# per-family deltas: small sliding windows so long sequences exercise the local-attention masks too
FAMILY_OVERRIDES: dict[str, dict] = {
    "mistral": dict(sliding_window=48),
    # a final-logit cap of 1 (HF default 30) so that tanh is visibly nonlinear on the tiny models' ~0.4 logits
    "gemma2": dict(sliding_window=48, query_pre_attn_scalar=8, final_logit_softcapping=1.0),
    "gemma3_text": dict(sliding_window=48, query_pre_attn_scalar=8, final_logit_softcapping=1.0),
    "phi3": dict(head_dim=None),  # phi3 derives head_dim from hidden/heads
}

# a shape-generic HF family that is NOT in the FAMILIES table (gated MLP, no logit post-processing)
GENERIC_FAMILY = "olmo2"
SUPPORTED_TYPES = sorted(FAMILIES)
ALL_TYPES = SUPPORTED_TYPES + [GENERIC_FAMILY]


GATED_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class GatedMLP(nn.Module):
    """The HF gated MLP shape, down(act(gate(x)) * up(x)): SwiGLU with silu, GeGLU with gelu-tanh (op tests)."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = GATED_ACTS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    """A tiny config of ``model_type`` (any HF causal-LM type); ``overrides`` win over the defaults."""
    kwargs = {**BASE, **FAMILY_OVERRIDES.get(model_type, {}), **overrides}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(model_type: str, dtype: torch.dtype = torch.float32, *, seed: int = 0,
               attn_implementation: str | None = None, **overrides) -> PreTrainedModel:
    """A randomly initialised tiny ``*ForCausalLM`` in train mode, deterministic in ``seed``.

    ``attn_implementation`` defaults to HF's choice for the family (sdpa, or eager where sdpa is unsupported).
    """
    cfg = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, **extra)
    return model.train()


def clone_model(model: nn.Module) -> nn.Module:
    """An independent copy with identical weights (tying preserved), so A/B runs start from the same point."""
    return copy.deepcopy(model)


def make_input_ids(batch: int, seq: int, vocab: int = VOCAB, *, seed: int = 1) -> torch.Tensor:
    """Random token ids (batch, seq) avoiding the pad/bos/eos ids."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


def make_labels(input_ids: torch.Tensor, kind: str = "prefix", *, ignore_index: int = -100) -> torch.Tensor:
    """Labels for ``input_ids`` (unshifted, HF convention).

    kind: "full" (every token), "prefix" (SFT-style: the first ~third ignored, different per row),
    "all_but_one" (only the last token of row 0 counts after HF's shift), "none" (every label ignored).
    """
    labels = input_ids.clone()
    batch, seq = labels.shape
    if kind == "full":
        return labels
    if kind == "prefix":
        for b in range(batch):
            labels[b, : (seq // 3) + b] = ignore_index
        return labels
    if kind == "all_but_one":
        labels.fill_(ignore_index)
        labels[0, -1] = input_ids[0, -1]  # predicted from position seq-2, so needs seq >= 2
        return labels
    if kind == "none":
        return labels.fill_(ignore_index)
    raise ValueError(f"unknown labels kind {kind!r}")


def grads_by_name(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter's gradient by name (tied weights appear once, under their first name)."""
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


NORM_RTOL = 1e-5


def assert_exact(actual: torch.Tensor, expected: torch.Tensor, name: str = "tensor") -> None:
    """fp32 "exact by construction": assert_close with its defaults (NaN-equal) AND a relative norm error of at
    most ``NORM_RTOL``. The normwise check is what makes gradient tests sensitive: tiny models have gradients of
    ~1e-3, where assert_close's atol=1e-5 alone would pass a 1 % error (exact runs measure <= 1e-6)."""
    torch.testing.assert_close(actual, expected, equal_nan=True, msg=lambda m: f"{name}: {m}")
    finite = torch.isfinite(expected)
    err = rel_err(actual[finite], expected[finite]) if finite.any() else 0.0
    assert err <= NORM_RTOL, f"{name}: relative norm error {err:.2e} > {NORM_RTOL}"


def assert_grads_close(actual: nn.Module, expected: nn.Module) -> None:
    """Every trainable parameter has a gradient, equal (``assert_exact``) to ``expected``'s."""
    got, ref = grads_by_name(actual), grads_by_name(expected)
    assert got.keys() == ref.keys()
    for name in ref:
        assert ref[name] is not None and got[name] is not None, f"{name}: missing gradient"
        assert_exact(got[name], ref[name], f"grad of {name}")


def patched_pair(model_type: str, apply_kwargs: dict | None = None, **overrides):
    """(reference, patched copy) of one tiny model with identical weights; the copy gets
    ``mst.apply(mlp_chunk_tokens=MLP_CHUNK, **apply_kwargs)``."""
    ref = tiny_model(model_type, **overrides)
    got = mst.apply(clone_model(ref), **{"mlp_chunk_tokens": MLP_CHUNK, **(apply_kwargs or {})})
    return ref, got


def assert_same_step(ref: nn.Module, got: nn.Module, **batch) -> torch.Tensor:
    """One forward+backward of ``batch`` on both models; loss (NaN-equal) and every gradient must match.
    Returns the reference loss."""
    losses = []
    for model in (ref, got):
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
    assert_exact(losses[1], losses[0], "loss")
    assert_grads_close(got, ref)
    return losses[0]


def assert_same_accumulation(ref: nn.Module, got: nn.Module, steps: int = 3) -> None:
    """``steps`` micro-batches of growing length backpropagated into the same .grad, normalised HF-Trainer style by
    num_items_in_batch (the valid-token count of the whole window): loss and gradients equal after every step."""
    micro = [make_input_ids(2, 40 + 7 * step, seed=10 + step) for step in range(steps)]
    micro = [(ids, make_labels(ids, "prefix")) for ids in micro]
    num_items = torch.tensor(sum(int((labels[:, 1:] != -100).sum()) for _, labels in micro))
    for ids, labels in micro:
        assert_same_step(ref, got, input_ids=ids, labels=labels, num_items_in_batch=num_items)


def rel_err(actual: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error ||actual - ref|| / ||ref|| computed in fp64."""
    a, r = actual.double(), ref.double()
    return float((a - r).norm() / r.norm().clamp_min(1e-30))


class MaxNumelMode(TorchDispatchMode):
    """Records the largest tensor any ATen op produces (forward and backward), to prove S x V logits never exist.

    ``with_dim``: only count tensors that have a dimension of that size (e.g. the vocabulary size, so attention's
    S x S scores in a whole model do not mask the check); ``dtype``: only tensors of that dtype.
    """

    def __init__(self, with_dim: int | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.with_dim, self.dtype = with_dim, dtype
        self.max_numel = 0
        self.max_op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.numel() > self.max_numel
                    and (self.with_dim is None or self.with_dim in t.shape)
                    and (self.dtype is None or t.dtype == self.dtype)):
                self.max_numel, self.max_op = t.numel(), f"{func} -> {tuple(t.shape)}"
        return out


def saved_tensor_bytes(fn: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()):
    """Run ``fn`` recording what autograd saves for backward; returns (result, bytes, largest numel).

    Bytes count each distinct storage once; storages of ``exclude`` (the parameters, which exist anyway) are
    left out, so the number is the activation memory that ``fn`` keeps alive until backward.
    """
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    storages: dict[int, int] = {}
    largest = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            storages[ptr] = t.untyped_storage().nbytes()
            largest[0] = max(largest[0], t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(storages.values()), largest[0]


# tiny multimodal wrappers (vision tower + projector + language model, lm_head on the wrapper), built offline: the
# text side has the same tiny shape as ``tiny_model``; 16 x 16 images in 8 x 8 patches give 4 image tokens
MULTIMODAL_TYPES = ("gemma3", "llava", "paligemma")
IMAGE_TOKEN = VOCAB - 1  # Gemma-3 also reserves VOCAB - 3 and VOCAB - 2 (begin / end of image)
TEXT_VOCAB = VOCAB - 3  # make_input_ids(..., vocab=TEXT_VOCAB) draws no image token
IMAGE_TOKENS_PER_IMAGE = 4
TINY_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                   patch_size=8)
MULTIMODAL_PARTS = {"gemma3": ("gemma3_text", "siglip_vision_model", {"final_logit_softcapping": None}),
                    "llava": ("llama", "clip_vision_model", {}),
                    "paligemma": ("gemma2", "siglip_vision_model", {})}


def tiny_multimodal_model(model_type: str, *, seed: int = 0, text_type: str | None = None,
                          **text_overrides) -> PreTrainedModel:
    """A randomly initialised tiny ``*ForConditionalGeneration`` in train mode: "gemma3" (Gemma-3 text + SigLIP),
    "llava" (Llama + CLIP) or "paligemma" (Gemma-2 text with a final-logit softcap of 1, i.e. PaliGemma-2, + SigLIP);
    ``text_type`` replaces the language model's family (Llava takes any), ``text_overrides`` go to its config."""
    default_text, vision_type, text_defaults = MULTIMODAL_PARTS[model_type]
    text_defaults = text_defaults if text_type in (None, default_text) else {}
    text = tiny_config(text_type or default_text, **{**text_defaults, **text_overrides})
    vision = AutoConfig.for_model(vision_type, **TINY_VISION)
    extra = {"gemma3": {"mm_tokens_per_image": IMAGE_TOKENS_PER_IMAGE, "boi_token_index": VOCAB - 3,
                        "eoi_token_index": VOCAB - 2},
             "paligemma": {"projection_dim": text.hidden_size}}.get(model_type, {})
    cfg = AutoConfig.for_model(model_type, text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN,
                               **extra)
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(cfg).train()


def argparse_exit(main, argv: list[str], capsys) -> str:
    """Call ``main(argv)`` (a script's entry point or parser), expect argparse's exit 2, return its stderr."""
    import pytest

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2, exc.value.code
    return capsys.readouterr().err
