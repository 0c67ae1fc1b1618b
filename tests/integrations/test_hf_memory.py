"""The memory claims hold through ``mst.apply`` on a real HF model, not only for the bare ops:

- a patched HF MLP keeps only its input for backward, the unpatched one every S x I intermediate;
- a patched model's training step (forward + backward with labels) never allocates a tensor with B x S x V
  elements, while the unpatched model does (the probe only counts tensors with a vocabulary-sized dimension, so
  attention's S x S scores cannot hide the check).
"""
from __future__ import annotations

import pytest
import torch

import mst
from tests.utils import MaxNumelMode, clone_model, make_input_ids, make_labels, saved_tensor_bytes, tiny_model


@pytest.mark.parametrize("model_type", ["llama", "phi3"])  # separate gate/up projections, and fused gate_up_proj
def test_patched_hf_mlp_saves_only_its_input(model_type):
    ref = tiny_model(model_type)
    got = mst.apply(clone_model(ref), lm_head=False, checkpointing=False, mlp_chunk_tokens=16)
    x = torch.randn(2, 128, ref.config.hidden_size, requires_grad=True)
    x_bytes = x.numel() * x.element_size()
    s_by_i = 2 * 128 * ref.config.intermediate_size
    results = {}
    for name, model in (("plain", ref), ("mst", got)):
        mlp = model.model.layers[0].mlp
        out, saved, largest = saved_tensor_bytes(lambda m=mlp: m(x), exclude=list(mlp.parameters()))
        out.sum().backward()
        results[name] = (saved, largest)
    assert results["mst"][0] == x_bytes
    assert results["mst"][1] < s_by_i
    assert results["plain"][0] - x_bytes >= 3 * s_by_i * x.element_size()


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_training_step_never_allocates_s_by_v(model_type):
    vocab, batch, seq = 211, 2, 512  # 211 is prime and equals no other dimension of the model
    ref = tiny_model(model_type, vocab_size=vocab)
    got = mst.apply(clone_model(ref), lm_head_chunk_tokens=32)
    ids = make_input_ids(batch, seq, vocab)
    labels = make_labels(ids, "prefix")
    peaks = {}
    for name, model in (("plain", ref), ("mst", got)):
        with MaxNumelMode(with_dim=vocab) as probe:
            model(input_ids=ids, labels=labels).loss.backward()
        peaks[name] = probe.max_numel
    assert peaks["plain"] >= batch * seq * vocab  # the probe sees the full logits of the unpatched model
    # the largest vocab-sized tensor is one chunk's logits or the V x d embedding / head (and their gradients)
    assert peaks["mst"] <= max(32 * vocab, vocab * ref.config.hidden_size)
