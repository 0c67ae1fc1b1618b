"""Optimizer-in-backward makes exactly the update of a normal AdamW step (fp32, several steps, with and without
gradient accumulation, tied embeddings and MsT's chunked ops), frees gradients at once, and round-trips its state."""
from __future__ import annotations

import copy

import pytest
import torch

import mst
from mst.memory import optimizer_in_backward
from tests.utils import clone_model, make_input_ids, tiny_model

KW = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)


def _train(model, batches, accumulation, in_backward):
    """Run len(batches) // accumulation optimizer steps; returns the handle (or the AdamW)."""
    if in_backward:
        opt = optimizer_in_backward(model, accumulation_steps=accumulation, **KW)
    else:
        opt = torch.optim.AdamW(model.parameters(), **KW)
    for i, ids in enumerate(batches):
        (model(input_ids=ids, labels=ids).loss / accumulation).backward()
        if not in_backward and (i + 1) % accumulation == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return opt


@pytest.mark.parametrize("accumulation", [1, 3])
@pytest.mark.parametrize("model_type,patch", [("llama", False), ("gemma2", True)])  # gemma2: tied embeddings
def test_equals_adamw(model_type, patch, accumulation):
    ref = tiny_model(model_type)
    got = clone_model(ref)
    if patch:
        ref, got = mst.apply(ref, mlp_chunk_tokens=16), mst.apply(got, mlp_chunk_tokens=16)
    batches = [make_input_ids(2, 40, seed=s) for s in range(3 * accumulation)]
    _train(ref, batches, accumulation, in_backward=False)
    handle = _train(got, batches, accumulation, in_backward=True)
    for (name, p), q in zip(ref.named_parameters(), got.parameters()):
        torch.testing.assert_close(q, p, msg=lambda m, n=name: f"{n}: {m}")
        assert q.grad is None, f"{name}: gradient not freed after the last micro-step"
    assert all(s == 3 * accumulation for s in handle.micro_steps)


def test_grads_kept_inside_accumulation_window_and_remove():
    model = tiny_model("llama")
    handle = optimizer_in_backward(model, accumulation_steps=2, **KW)
    before = [p.detach().clone() for p in model.parameters()]
    ids = make_input_ids(1, 16)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # first micro-step: accumulate only
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    handle.remove()
    model(input_ids=ids, labels=ids).loss.backward()  # no hooks: no step, grads keep accumulating
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is not None for p in model.parameters())


def test_state_dict_round_trip():
    a = tiny_model("llama")
    b = clone_model(a)
    ha = optimizer_in_backward(a, **KW)
    ids = make_input_ids(1, 16)
    a(input_ids=ids, labels=ids).loss.backward()
    b.load_state_dict(a.state_dict())
    hb = optimizer_in_backward(b, **KW)
    hb.load_state_dict(copy.deepcopy(ha.state_dict()))  # as if saved to disk: no shared state tensors
    for model in (a, b):
        model(input_ids=ids, labels=ids).loss.backward()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p)
    with pytest.raises(ValueError, match="does not match"):
        hb.load_state_dict({"optimizers": {}, "micro_steps": {}})


def test_bad_input():
    with pytest.raises(ValueError, match="accumulation_steps"):
        optimizer_in_backward(tiny_model("llama"), accumulation_steps=0)
    frozen = tiny_model("llama").requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        optimizer_in_backward(frozen)
