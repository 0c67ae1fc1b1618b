"""Copies and serialisation of a patched model: each patch follows the module it sits on.

TRL's DPO reference model and EMA weights are ``copy.deepcopy``s of the policy; ``torch.save(model)`` pickles it.
A copy must run its own modules (its own loss, gradients into its own parameters), a pickle must round-trip, and
``mst.revert`` must work on either. The same holds for the other ways a model is moved or refilled: a state-dict
round trip into a fresh patched model and a dtype change after ``apply``.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch

import mst
from tests.utils import MLP_CHUNK, assert_same_step, clone_model, make_input_ids, make_labels, tiny_model


def patched_modules(model) -> list[str]:
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


def perturb_(model) -> None:
    """Change every weight, so a copy that still ran the original's modules would give another loss."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)


def batch() -> dict[str, torch.Tensor]:
    ids = make_input_ids(2, 2 * MLP_CHUNK + 3)
    return {"input_ids": ids, "labels": make_labels(ids, "prefix")}


def pickle_round_trip(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_deepcopy_runs_its_own_modules(model_type):
    ref = tiny_model(model_type)
    original = mst.apply(clone_model(ref), mlp_chunk_tokens=MLP_CHUNK)
    copied = copy.deepcopy(original)
    vanilla = clone_model(ref)
    perturb_(copied)
    perturb_(vanilla)
    assert_same_step(vanilla, copied, **batch())
    assert all(p.grad is None for p in original.parameters()), "gradients reached the original"
    assert copied.mst_options == original.mst_options
    assert mst.revert(copied) is copied and patched_modules(copied) == []
    assert len(patched_modules(original)) == 1 + ref.config.num_hidden_layers  # the original keeps its patch
    out = copied(**batch())
    assert out.logits is not None
    torch.testing.assert_close(out.loss, vanilla(**batch()).loss)


@pytest.mark.parametrize("options", [{}, {"checkpointing": False}, {"offload_checkpoints": True}],
                         ids=["default", "no_checkpointing", "offload"])
def test_pickle_round_trip(options):
    """torch.save / torch.load of a whole patched model, checkpointing included (HF's own enable leaves an
    unpicklable hook on the embeddings, which mst must not add)."""
    ref = tiny_model("qwen2")
    loaded = pickle_round_trip(mst.apply(clone_model(ref), mlp_chunk_tokens=MLP_CHUNK, **options))
    assert loaded.mst_options.mlp_chunk_tokens == MLP_CHUNK
    assert_same_step(ref, loaded, **batch())
    mst.revert(loaded)
    assert patched_modules(loaded) == [] and not loaded.is_gradient_checkpointing
    with torch.no_grad():
        out, out_ref = loaded(**batch()), ref(**batch())
    torch.testing.assert_close(out.loss, out_ref.loss)
    torch.testing.assert_close(out.logits, out_ref.logits)


def test_state_dict_round_trip_into_fresh_patched_model():
    ref = tiny_model("mistral")
    trained = mst.apply(clone_model(ref))
    perturb_(trained)
    assert trained.state_dict().keys() == ref.state_dict().keys()  # the patches add no state
    fresh = mst.apply(tiny_model("mistral", seed=7), mlp_chunk_tokens=MLP_CHUNK)
    fresh.load_state_dict(trained.state_dict())
    vanilla = clone_model(ref)
    perturb_(vanilla)
    assert_same_step(vanilla, fresh, **batch())


def test_dtype_change_after_apply():
    """``.to(dtype)`` after apply: the patches read the module's current weights, not the ones seen at apply."""
    ref = tiny_model("gemma").to(torch.float64)
    got = mst.apply(clone_model(tiny_model("gemma")), mlp_chunk_tokens=MLP_CHUNK).to(torch.float64)
    assert_same_step(ref, got, **batch())
