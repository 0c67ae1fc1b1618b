"""Quantized training (Table 5): k-bit frozen projections + LoRA, MsT exact on top of it, and the planner's mode.

bitsandbytes runs its int8 and NF4 kernels on CPU, so everything here is the real library code path.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import mst
from mst.configs import scaled_config
from mst.memory import measure_peak, plan
from mst.memory.planner import max_seq_len
from mst.memory.planner.spec import ModelSpec
from mst.memory.quantization import QUANTIZATIONS, quantize_for_training
from mst.memory.strategies import make_train_step, prepare
from tests.utils import MLP_CHUNK, assert_exact, clone_model, make_input_ids, make_labels, tiny_config, tiny_model

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

STORAGE = {"nf4": torch.uint8, "int8": torch.int8}


def quantized(model_type: str, quantization: str, rank: int = 4):
    model = quantize_for_training(tiny_model(model_type), quantization, lora_rank=rank)
    torch.manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # LoRA starts with B = 0; a nonzero B makes every adapter gradient nonzero
            param.data.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_only_lora_trains_and_weights_are_quantized(quantization):
    model = quantized("llama", quantization, rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    spec = ModelSpec.from_config(tiny_config("llama"))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == spec.layers * spec.lora_layer_params(4)
    gate = model.model.layers[0].mlp.gate_proj.base_layer
    assert gate.weight.dtype == STORAGE[quantization] and not gate.weight.requires_grad


@pytest.mark.parametrize("seq_len", [1, 7, 125])
@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_mst_is_exact_on_a_quantized_model(model_type, quantization, seq_len):
    ref = quantized(model_type, quantization)
    got = clone_model(ref)
    mst.apply(got.train(), mlp_chunk_tokens=MLP_CHUNK, lm_head_chunks=3)
    mst.apply(ref.train(), mlp=False, lm_head=False)  # the same checkpointing, the unchunked MLP and LM head
    ids = make_input_ids(2, seq_len)
    labels = make_labels(ids, "prefix")
    losses = []
    for model in (ref, got):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        losses.append(loss)
    assert_exact(losses[1], losses[0], "loss")
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for name, param in got.named_parameters():
        if param.requires_grad:
            assert_exact(param.grad, ref_grads[name], name)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_for_training(tiny_model("llama"), "fp8")
    with pytest.raises(ValueError, match="lora_rank"):
        quantize_for_training(tiny_model("llama"), "nf4", lora_rank=0)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_for_training(quantized("llama", "nf4"), "nf4")
    with pytest.raises(ValueError, match="unknown quantization"):
        plan("llama3-8b", 1024, "mst", quantization="int4")
    with pytest.raises(ValueError, match="analytic engine only"):
        plan("llama3-8b", 1024, "mst", quantization="nf4", engine="traced")


def test_planner_static_terms_shrink():
    bf16 = plan("llama3-8b", 1024, "mst", optimizer="adamw_in_backward").breakdown
    nf4 = plan("llama3-8b", 1024, "mst", optimizer="adamw_in_backward", quantization="nf4").breakdown
    int8 = plan("llama3-8b", 1024, "mst", optimizer="adamw_in_backward", quantization="int8").breakdown
    assert nf4["weights"] < int8["weights"] < bf16["weights"]
    assert 5.5 < nf4["weights"] / 2 ** 30 < 6.0  # 7.0B projections at 0.5625 B + 1.05B bf16 embeddings/head
    assert nf4["optimizer_state"] < 0.01 * bf16["optimizer_state"]
    assert max_seq_len("llama3-8b", "mst", quantization="nf4") > max_seq_len("llama3-8b", "mst")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ac", "mst"])
@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_planner_matches_measured_quantized_step(quantization, strategy):
    """The analytic engine's quantized mode against a measured CPU step (5%, as for the bf16 model)."""
    config = scaled_config("llama3-8b", 64, num_hidden_layers=2)
    torch.manual_seed(0)
    model = prepare(AutoModelForCausalLM.from_config(config, dtype=torch.float32), strategy, quantization=quantization)
    step, track = make_train_step(model, optimizer="adamw")
    step(1024)
    measured = measure_peak(lambda: step(1024), track).peak_bytes
    planned = plan(config, 1024, strategy, dtype=torch.float32, device="cpu", quantization=quantization).peak_bytes
    assert abs(planned - measured) <= 0.05 * measured, (planned, measured, (planned - measured) / measured)
