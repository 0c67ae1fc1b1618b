"""Under torch.autocast the backward recomputes run in the forward's precision (autograd runs backward outside the
caller's autocast region, so the ops re-enter it): MsT's error against fp32 is no worse than vanilla autocast's."""
from __future__ import annotations

import pytest
import torch

import mst
from tests.utils import clone_model, tiny_model


def _grads(model, ids, autocast: bool) -> dict[str, torch.Tensor]:
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _global_rel_err(grads: dict, ref: dict) -> float:
    num = sum(float((grads[n] - g).norm()) ** 2 for n, g in ref.items())
    return (num / sum(float(g.norm()) ** 2 for g in ref.values())) ** 0.5


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_autocast_bf16_error_no_worse_than_vanilla(model_type):
    ref = tiny_model(model_type)
    ids = torch.randint(0, ref.config.vocab_size, (2, 45))
    fp32 = _grads(clone_model(ref), ids, autocast=False)
    vanilla = _grads(clone_model(ref), ids, autocast=True)
    patched = _grads(mst.apply(clone_model(ref), mlp_chunk_tokens=16, lm_head_chunk_tokens=16), ids, autocast=True)
    assert _global_rel_err(patched, fp32) <= 1.05 * _global_rel_err(vanilla, fp32) + 1e-5
