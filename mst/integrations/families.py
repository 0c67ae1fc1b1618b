"""Which HF causal-LM families MsT supports, as data (one row per ``config.model_type``).

A row says where the decoder layers and their MLPs live and how the final logits are post-processed, so that
``mst.apply`` needs no per-family code. Config attributes are read from the text config (``text_config``), and a
multimodal wrapper outside the table uses its language model's row, so PaliGemma-2 (whose softcap lives in
``config.text_config``) is read like Gemma-2.
Families outside the table are accepted when their MLPs are dense and token-wise: the gated
``gate_proj``/``up_proj``/``down_proj`` (or fused ``gate_up_proj``/``down_proj``) shape, see ``is_gated_mlp``, or
two projections around an activation (Phi's ``fc1``/``fc2``, StarCoder2's ``c_fc``/``c_proj``, GPT-NeoX's
``dense_h_to_4h``/``dense_4h_to_h``), see ``is_tokenwise_mlp``, and their configs set none of the known logit
post-processing attributes (``LOGIT_POSTPROCESSING_ATTRS``); ``mst.apply`` then also checks their loss against the
model's own at apply time, since no list can name every way a forward rescales its logits.

The same rows are the memory planner's family facts (``mst.memory.planner.ModelSpec.from_config`` reads them, so
``mst.apply`` and the planner cannot disagree about which families exist): how many norms a layer has and how they
compute, biases, fused projections, the embedding scale, the block layout. Each column's comment says what it
changes in the memory model (``mst/memory/planner/analytic.py``); a family outside the table has no such facts,
so the planner refuses it (``mst.apply`` still accepts it through the generic gated-MLP path).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


NORM_KINDS = ("rms", "gemma", "layer")


@dataclass(frozen=True)
class Family:
    """One HF model family: where ``mst.apply`` finds the pieces it replaces and how the logits are post-processed
    (first three columns), and the facts of its decoder that the memory planner's terms depend on (the rest)."""

    mlp_attr: str = "mlp"  # attribute of each decoder layer holding the MLP
    softcap_attr: str | None = None  # config attribute with the final-logit softcap (Gemma-2/3)
    logit_scale_attr: str | None = None  # config attribute multiplying logits (Cohere-style)
    logit_divisor_attr: str | None = None  # config attribute dividing logits (Granite's logits_scaling)
    # --- memory planner (per decoder layer unless said otherwise; "saves" = kept by autograd for backward)
    # norms on the hidden state: 2 (before attention, before the MLP); 4 for Gemma-2/3 (also after each: one more
    # saved norm per sub-block, and the MLP's backward starts in a norm); 1 for Cohere (shared by attention + MLP)
    norms_per_layer: int = 2
    # how a norm computes. "rms": fp32 statistics, x cast back to the model dtype, then * w (Llama): it saves its
    # fp32 input, rstd and the cast-back x. "gemma": fp32 x * (1 + w.float()), cast at the end: the normalised x it
    # saves is fp32. "layer": Cohere's mean-centred fp32 LayerNorm (no bias parameter), w applied in fp32: it saves
    # x - mean twice (computed again for the product), the normalised x and rstd, not its input
    norm: str = "rms"
    # per-head norm of q and k before RoPE (Qwen3, Gemma-3; a config flag's name where optional: Cohere's
    # use_qk_norm): each saves what a norm of its kind saves, over q / k (weights: head_dim each; per head for
    # Cohere's LayerNorm), and its backward is a norm backward over q / k
    qk_norm: bool | str = False
    # where the q/k norms run: right after their own projections, before v's (Qwen3: in backward, v's projection
    # has already produced its input gradient when they run), or after all three projections (Gemma-3, Cohere:
    # v's and k's gradients wait instead)
    qk_norm_interleaved: bool = False
    qkv_bias: bool = False  # q/k/v projections always have a bias, whatever config.attention_bias says (Qwen2)
    # one qkv_proj whose output q, k, v are views of (Phi-3): saving v keeps the whole q|k|v output alive
    fused_qkv: bool = False
    # one gate_up_proj (Phi-3): gate and up are halves of one 2 x S x I output (same bytes; one weight tensor)
    fused_gate_up: bool = False
    # attention and MLP both read the one norm output and are added to the residual together (Cohere): no second
    # norm, and the MLP's input is the attention's
    parallel_block: bool = False
    # q and k are cast to fp32 for RoPE and back (Cohere): fp32 copies of q and k in the forward, in the
    # checkpoint's recompute and in RoPE's backward (bf16 / fp16 models)
    rope_fp32: bool = False
    # RoPE rotates the first partial_rotary_factor of each head and concatenates the rest back (Phi-3): q and k
    # come out as contiguous (B, H, S, hd) copies, so the attention output needs a transposed copy for o_proj
    # (one more q-sized tensor saved) where Llama's rotated q keeps the (B, S, H, hd) layout
    rope_cat: bool = False
    # embeddings multiplied by sqrt(d) in the model dtype (Gemma family): one more hidden-sized tensor in the
    # embedding backward (the scaled output's gradient)
    embed_scale: bool = False
    tied_embeddings: bool = False  # tie_word_embeddings' default in the family's config class
    # None: the analytic engine has this family's terms; else why not (the traced engine, which runs the family's
    # own code, still plans it)
    analytic_gap: str | None = None

    def __post_init__(self) -> None:
        if self.norm not in NORM_KINDS:
            raise ValueError(f"Family.norm must be one of {NORM_KINDS}, got {self.norm!r}")
        if self.norms_per_layer not in (1, 2, 4):
            raise ValueError(f"Family.norms_per_layer must be 1, 2 or 4, got {self.norms_per_layer!r}")
        if (self.norms_per_layer == 1) != self.parallel_block:
            raise ValueError("Family: one norm per layer goes with a parallel attention + MLP block and back")


_GEMMA = dict(norm="gemma", embed_scale=True, tied_embeddings=True)
FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(qkv_bias=True),
    "qwen3": Family(qk_norm=True, qk_norm_interleaved=True),
    "gemma": Family(**_GEMMA),
    "gemma2": Family(softcap_attr="final_logit_softcapping", norms_per_layer=4, **_GEMMA),
    "gemma3_text": Family(softcap_attr="final_logit_softcapping", norms_per_layer=4, qk_norm=True, **_GEMMA),
    "phi3": Family(fused_qkv=True, fused_gate_up=True, rope_cat=True),
    # Llama-shaped; its embedding / residual / attention multipliers run inside HF's own model code, and the logits
    # are divided by logits_scaling
    "granite": Family(logit_divisor_attr="logits_scaling",
                      analytic_gap="its residual multiplier's extra hidden-size tensors are not in its terms"),
    "cohere": Family(logit_scale_attr="logit_scale", norms_per_layer=1, norm="layer", qk_norm="use_qk_norm",
                     parallel_block=True, rope_fp32=True, tied_embeddings=True),
}

# Config attributes through which HF families post-process the LM-head logits (scale, divide, softcap), with their
# neutral values. A model outside FAMILIES that sets one is refused: the generic path would silently optimise a
# different loss than HF's (e.g. Granite divides by ``logits_scaling``, Falcon-H1 multiplies by ``lm_head_multiplier``).
LOGIT_POSTPROCESSING_ATTRS = {"logit_scale": (None, 1.0), "logits_scaling": (None, 1.0),
                              "lm_head_multiplier": (None, 1.0), "final_logit_softcapping": (None,)}

GATED_MLP_SHAPES = (("gate_proj", "up_proj", "down_proj"), ("gate_up_proj", "down_proj"))
# dense MLPs without a gate: up-projection, activation, down-projection (Phi-1/2, StarCoder2, GPT-NeoX)
PLAIN_MLP_SHAPES = (("fc1", "fc2"), ("c_fc", "c_proj"), ("dense_h_to_4h", "dense_4h_to_h"))


def text_config(config: object) -> object:
    """The config of the text decoder: ``config`` itself for a plain causal LM, the nested text config of a
    multimodal wrapper (whose top level may lack ``hidden_size`` or, as PaliGemma's, carry an unrelated one)."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def is_gated_mlp(module: nn.Module) -> bool:
    """True for a dense, token-wise gated MLP (the shape MsT chunks): Linear projections named as in HF."""
    return any(all(isinstance(getattr(module, name, None), nn.Linear) for name in names)
               for names in GATED_MLP_SHAPES)


def is_tokenwise_mlp(module: nn.Module) -> bool:
    """True for a dense MLP mini-sequences can split: gated (``is_gated_mlp``) or two Linear projections around an
    activation, named as in HF (``PLAIN_MLP_SHAPES``). An MoE block is not: its router mixes nothing across tokens
    but its auxiliary loss does, which a per-chunk recompute would not reproduce."""
    return is_gated_mlp(module) or any(all(isinstance(getattr(module, name, None), nn.Linear) for name in names)
                                       for names in PLAIN_MLP_SHAPES)


def family_of(model_type: str, layers: nn.ModuleList | None, config: object = None) -> Family:
    """The family row for ``model_type``; for a multimodal wrapper outside the table, its language model's row (by
    the text config's ``model_type``: PaliGemma-2 reads Gemma-2's softcap, now from ``config.text_config``); else a
    generic row when every layer has a token-wise MLP (``is_tokenwise_mlp``) and neither ``config`` nor its text
    config post-processes the logits; else ValueError."""
    row = FAMILIES.get(model_type) or FAMILIES.get(getattr(text_config(config), "model_type", None))
    if row is not None:
        return row
    postprocessing = {name: getattr(cfg, name) for cfg in (config, text_config(config))
                      for name, neutral in LOGIT_POSTPROCESSING_ATTRS.items()
                      if getattr(cfg, name, None) not in neutral}
    if postprocessing:
        raise ValueError(
            f"mst.apply: model_type {model_type!r} is not in the supported families and post-processes its logits "
            f"({postprocessing}), which the generic path cannot reproduce exactly. Supported families: "
            f"{', '.join(sorted(FAMILIES))}.")
    if layers is not None and len(layers) and all(is_tokenwise_mlp(getattr(layer, "mlp", None) or nn.Module())
                                                  for layer in layers):
        return Family()
    raise ValueError(
        f"mst.apply: model_type {model_type!r} is not supported: its decoder layers have no dense token-wise MLP "
        f"at .mlp (gated: gate_proj/up_proj/down_proj or gate_up_proj/down_proj; or fc1/fc2, c_fc/c_proj, "
        f"dense_h_to_4h/dense_4h_to_h; an MoE block is not one). Supported families: {', '.join(sorted(FAMILIES))}, "
        "plus any *ForCausalLM whose layers have such an MLP.")
