"""Quantized training (the paper's Table 5): frozen k-bit base weights plus trainable LoRA adapters.

A bitsandbytes-quantized weight cannot be trained itself, so Hugging Face's own recipe for "training an 8-bit /
4-bit model" is QLoRA: the decoder's linear layers are stored as LLM.int8 (``"int8"``) or NF4 (``"nf4"``) and
frozen, and PEFT LoRA adapters on every one of them are what the optimizer updates. The paper only says its lossy
rows use "HuggingFace official implementations", so this is our reading of it (docs/paper.md, Table 5).

    model = quantize_for_training(model, "nf4")       # then mst.apply(model) or not: MsT is exact on top of it
    step, track = make_train_step(model, ...)         # only the LoRA parameters require gradients

Design choices, all documented in experiments/table5/README.md: embeddings, norms and the LM head stay unquantized
and frozen (bitsandbytes and HF skip the output layer as well); the model keeps its dtype (PEFT's
``prepare_model_for_kbit_training`` would upcast those to fp32, 4 GB more for Llama3-8B); LoRA rank 16, alpha 32,
no dropout, on all seven projections of every layer, in the model's dtype like every other trained weight here
(fp32 adapters on a bf16 model would make PEFT cast each projection's input to fp32, up to 4 x T x I bytes per layer). Checkpointing and MsT are chosen separately
by the training strategy, as for the bf16 model.
"""
from __future__ import annotations

from torch import nn

QUANTIZATIONS = ("int8", "nf4")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_BLOCK = 64  # bitsandbytes' default NF4 block size: one fp32 absmax per 64 weights


def _require(package: str):
    try:
        return __import__(package)
    except ImportError as exc:
        raise ImportError(f"quantized training needs `{package}` (pinned in requirements.txt; "
                          f"`bash scripts/bootstrap.sh` installs it)") from exc


def _quantized_linear(linear: nn.Linear, quantization: str) -> nn.Module:
    """A frozen bitsandbytes copy of ``linear``; the weight is quantized when moved to the target device."""
    bnb = _require("bitsandbytes")
    device, dtype = linear.weight.device, linear.weight.dtype
    weight = linear.weight.data.to("cpu")  # bitsandbytes quantizes on the host -> device move
    if quantization == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=dtype, quant_type="nf4", compress_statistics=False)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", blocksize=NF4_BLOCK,
                                         compress_statistics=False)
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.to("cpu"), requires_grad=False)
    return layer.to(device)


def quantize_for_training(model: nn.Module, quantization: str, *, lora_rank: int = 16,
                          lora_alpha: int = 32) -> nn.Module:
    """Quantize ``model``'s decoder projections in place (``"int8"`` or ``"nf4"``), freeze every weight and add
    LoRA adapters (rank ``lora_rank``) that are the only trainable parameters. Returns the same model object."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose from {', '.join(QUANTIZATIONS)}")
    if not isinstance(lora_rank, int) or lora_rank <= 0:
        raise ValueError(f"lora_rank must be a positive integer, got {lora_rank!r}")
    peft = _require("peft")
    replaced = 0
    for layer in model.get_decoder().layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if name in LORA_TARGETS and type(child) is nn.Linear:
                    setattr(parent, name, _quantized_linear(child, quantization))
                    replaced += 1
    if not replaced:
        raise ValueError(f"no nn.Linear named {', '.join(LORA_TARGETS)} in the decoder layers of "
                         f"{type(model).__name__} (already quantized?)")
    dtype = model.get_input_embeddings().weight.dtype
    model.requires_grad_(False)
    config = peft.LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    peft.inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(dtype)  # the model's dtype: no per-layer input casts (see module doc)
            param.requires_grad_(True)
    return model


def quantized_weight_bytes(params: int, out_features: int, quantization: str) -> int:
    """Device bytes of one frozen quantized weight matrix of ``params`` elements (``out_features`` rows)."""
    if quantization == "nf4":
        return params // 2 + 4 * -(-params // NF4_BLOCK)  # two weights per byte + one fp32 absmax per block
    if quantization == "int8":
        return params + 4 * out_features  # one byte per weight + one fp32 scale per row
    raise ValueError(f"unknown quantization {quantization!r}; choose from {', '.join(QUANTIZATIONS)}")


__all__ = ["LORA_TARGETS", "QUANTIZATIONS", "quantize_for_training", "quantized_weight_bytes"]
