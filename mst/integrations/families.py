"""Which HF causal-LM families MsT supports, as data (one row per ``config.model_type``).

A row says where the decoder layers and their MLPs live and how the final logits are post-processed, so that
``mst.apply`` needs no per-family code. Config attributes are read from the text config (``text_config``), and a
multimodal wrapper outside the table uses its language model's row, so PaliGemma-2 (whose softcap lives in
``config.text_config``) is read like Gemma-2.
Families outside the table are accepted when their MLPs have the gated ``gate_proj``/``up_proj``/``down_proj`` (or
fused ``gate_up_proj``/``down_proj``) shape, see ``is_gated_mlp``, and their configs set none of the known logit
post-processing attributes (``LOGIT_POSTPROCESSING_ATTRS``); ``mst.apply`` then also checks their loss against the
model's own at apply time, since no list can name every way a forward rescales its logits.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Family:
    """How to find the pieces MsT replaces in one HF model family."""

    mlp_attr: str = "mlp"  # attribute of each decoder layer holding the MLP
    softcap_attr: str | None = None  # config attribute with the final-logit softcap (Gemma-2/3)
    logit_scale_attr: str | None = None  # config attribute multiplying logits (Cohere-style)


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(),
    "qwen3": Family(),
    "gemma": Family(),
    "gemma2": Family(softcap_attr="final_logit_softcapping"),
    "gemma3_text": Family(softcap_attr="final_logit_softcapping"),
    "phi3": Family(),
    "cohere": Family(logit_scale_attr="logit_scale"),
}

# Config attributes through which HF families post-process the LM-head logits (scale, divide, softcap), with their
# neutral values. A model outside FAMILIES that sets one is refused: the generic path would silently optimise a
# different loss than HF's (e.g. Granite divides by ``logits_scaling``, Falcon-H1 multiplies by ``lm_head_multiplier``).
LOGIT_POSTPROCESSING_ATTRS = {"logit_scale": (None, 1.0), "logits_scaling": (None, 1.0),
                              "lm_head_multiplier": (None, 1.0), "final_logit_softcapping": (None,)}

GATED_MLP_SHAPES = (("gate_proj", "up_proj", "down_proj"), ("gate_up_proj", "down_proj"))


def text_config(config: object) -> object:
    """The config of the text decoder: ``config`` itself for a plain causal LM, the nested text config of a
    multimodal wrapper (whose top level may lack ``hidden_size`` or, as PaliGemma's, carry an unrelated one)."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def is_gated_mlp(module: nn.Module) -> bool:
    """True for a dense, token-wise gated MLP (the shape MsT chunks): Linear projections named as in HF."""
    return any(all(isinstance(getattr(module, name, None), nn.Linear) for name in names)
               for names in GATED_MLP_SHAPES)


def family_of(model_type: str, layers: nn.ModuleList | None, config: object = None) -> Family:
    """The family row for ``model_type``; for a multimodal wrapper outside the table, its language model's row (by
    the text config's ``model_type``: PaliGemma-2 reads Gemma-2's softcap, now from ``config.text_config``); else a
    generic row when every layer has a gated MLP and neither ``config`` nor its text config post-processes the
    logits; else ValueError."""
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
    if layers is not None and len(layers) and all(is_gated_mlp(getattr(layer, "mlp", None) or nn.Module())
                                                  for layer in layers):
        return Family()
    raise ValueError(
        f"mst.apply: model_type {model_type!r} is not supported: its decoder layers have no dense gated MLP "
        f"(gate_proj/up_proj/down_proj or gate_up_proj/down_proj). Supported families: {', '.join(sorted(FAMILIES))}, "
        "plus any *ForCausalLM whose layers have such an MLP.")
