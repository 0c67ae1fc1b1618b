"""Adapters, hooks and custom LM heads under ``mst.apply``: whatever the unpatched model runs, mst runs too.

A PEFT LoRA adapter (with dropout) on the MLP or on ``lm_head``, a forward hook on ``lm_head`` and an ``lm_head``
subclass with its own forward must give the unpatched model's loss and gradients, adapter weights included; dropout
inside a recomputed mini-sequence must replay the forward's masks, so the gradient is that of the returned loss.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import mst
from tests.utils import MLP_CHUNK, assert_exact, assert_same_step, clone_model, make_input_ids, make_labels, tiny_model

peft = pytest.importorskip("peft")

MLP_TARGETS = ["gate_proj", "up_proj", "down_proj"]


def _lora(model: nn.Module, targets: list[str], dropout: float = 0.0) -> nn.Module:
    """LoRA in place (the model keeps its HF type), with nonzero B so the adapter changes the output."""
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, init_lora_weights=False)
    peft.inject_adapter_in_model(config, model)
    return model


def _batch(seq: int = 40):
    ids = make_input_ids(2, seq)
    return {"input_ids": ids, "labels": make_labels(ids, "prefix")}


def _seeded_step(model: nn.Module, batch: dict, seed: int = 7) -> torch.Tensor:
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_lora_dropout_in_the_mlp_replays_the_forward_masks(model_type):
    """The recomputing MLP vs the official plain loop (mlp_mode="naive", which keeps the forward's graph): with
    dropout both must draw the same masks chunk by chunk, so loss and every gradient agree exactly."""
    base = _lora(tiny_model(model_type), MLP_TARGETS, dropout=0.3)
    ref = mst.apply(clone_model(base), mlp_chunk_tokens=MLP_CHUNK, mlp_mode="naive")
    got = mst.apply(clone_model(base), mlp_chunk_tokens=MLP_CHUNK)
    batch = _batch()
    assert_exact(_seeded_step(got, batch), _seeded_step(ref, batch), "loss")
    for (name, p), q in zip(ref.named_parameters(), got.parameters()):
        if p.requires_grad:
            assert_exact(q.grad, p.grad, f"grad of {name}")
    assert any("lora" in n and p.grad is not None for n, p in got.named_parameters())


def test_lora_dropout_gradient_is_the_gradient_of_the_returned_loss():
    """Directional derivative of the seeded loss vs a central finite difference, float64 weights (the loss itself is
    fp32, as HF upcasts logits to fp32, hence the step 1e-3 and a 0.2% tolerance; fresh masks gave 0.09 vs -4.47)."""
    model = mst.apply(_lora(tiny_model("llama", dtype=torch.float64), MLP_TARGETS, dropout=0.3),
                      mlp_chunk_tokens=MLP_CHUNK, lm_head=False)
    batch = _batch()
    params = [p for p in model.parameters() if p.requires_grad]
    _seeded_step(model, batch)
    gen = torch.Generator().manual_seed(0)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    analytic = sum(float((p.grad * v).sum()) for p, v in zip(params, direction))
    eps = 1e-3

    def loss_at(t: float) -> float:
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.add_(v, alpha=t)
            torch.manual_seed(7)
            value = float(model(**batch).loss)
            for p, v in zip(params, direction):
                p.sub_(v, alpha=t)
        return value

    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=2e-3)


def test_lora_on_the_lm_head_before_apply():
    ref = _lora(tiny_model("llama"), ["lm_head", *MLP_TARGETS])
    got = mst.apply(clone_model(ref), mlp_chunk_tokens=MLP_CHUNK)
    assert_same_step(ref, got, **_batch())
    assert got.lm_head.lora_B["default"].weight.grad is not None


def test_lora_on_the_lm_head_after_apply():
    ref = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"], init_lora_weights=False))
    got = mst.apply(tiny_model("llama"), mlp_chunk_tokens=MLP_CHUNK)
    got = peft.get_peft_model(got, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"],
                                                   init_lora_weights=False))
    got.load_state_dict(ref.state_dict())
    assert_same_step(ref, got, **_batch())


class ScaledHead(nn.Linear):
    """An lm_head subclass with its own forward (e.g. a muP-style output multiplier)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.5


def test_lm_head_subclass_with_its_own_forward():
    ref = tiny_model("llama")
    head = ScaledHead(ref.config.hidden_size, ref.config.vocab_size, bias=False)
    head.weight = ref.lm_head.weight
    ref.lm_head = head
    got = mst.apply(clone_model(ref), mlp_chunk_tokens=MLP_CHUNK)
    assert_same_step(ref, got, **_batch(seq=37))


@pytest.mark.parametrize("when", ["before", "after"])
def test_forward_hook_on_the_lm_head(when):
    def hook(module, args, output):
        return output + 0.25 * output.tanh()

    ref = tiny_model("llama")
    ref.lm_head.register_forward_hook(hook)
    got = tiny_model("llama")
    if when == "before":
        got.lm_head.register_forward_hook(hook)
    mst.apply(got, mlp_chunk_tokens=MLP_CHUNK)
    if when == "after":
        got.lm_head.register_forward_hook(hook)
    assert_same_step(ref, got, **_batch(seq=7))
