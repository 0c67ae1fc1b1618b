"""mst.train.loop: accumulation semantics, accumulation order, optimizer groups, vanilla == MsT on ragged data."""
import pytest
import torch

import mst
from mst.train import TrainConfig, make_optimizer, train
from tests.convergence.synthetic import ragged_batches
from tests.utils import tiny_model


def _f32(rows, key="loss"):
    """A logged fp32 metric as a float32 tensor, so assert_close applies fp32 tolerances (not float64's)."""
    return torch.tensor([r[key] for r in rows], dtype=torch.float32)


def _cfg(**kw):
    return TrainConfig(**{"steps": 3, "grad_accum": 2, "lr": 1e-3, **kw})


def test_config_validation():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="micro_order"):
        TrainConfig(steps=1, micro_order="shuffled")
    with pytest.raises(ValueError, match="ckpt_every"):
        TrainConfig(steps=1, ckpt_every=-1)


def test_weight_decay_only_on_matrices():
    opt = make_optimizer(tiny_model("llama"), TrainConfig(steps=1, weight_decay=0.001))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.001 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])


def test_step_loss_is_the_token_mean_over_accumulated_micro_batches(tmp_path):
    """2 micro-batches of 1 row == 1 micro-batch of the same 2 rows (ragged rows: needs num_items_in_batch)."""
    one = ragged_batches(seed=1)

    def pairs(g):
        a, b = one(2 * g), one(2 * g + 1)
        return {k: torch.cat([a[k], b[k]]) for k in a}

    m1, m2 = tiny_model("llama"), tiny_model("llama")
    r1 = train(m1, one, _cfg(), out_dir=tmp_path / "a", use_wandb=False, progress=False)
    r2 = train(m2, pairs, _cfg(grad_accum=1), out_dir=tmp_path / "b", use_wandb=False, progress=False)
    torch.testing.assert_close(_f32(r1), _f32(r2))
    assert [r["tokens"] for r in r1] == [r["tokens"] for r in r2]
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2)


def test_reverse_order_same_first_step(tmp_path):
    data = ragged_batches(seed=2)  # grad_accum 3: a sum of two would be commutative
    fwd = train(tiny_model("llama"), data, _cfg(grad_accum=3), out_dir=tmp_path / "f", use_wandb=False, progress=False)
    rev = train(tiny_model("llama"), data, _cfg(grad_accum=3, micro_order="reverse"), out_dir=tmp_path / "r",
                use_wandb=False, progress=False)
    torch.testing.assert_close(_f32(fwd[:1]), _f32(rev[:1]))
    torch.testing.assert_close(_f32(fwd), _f32(rev), rtol=1e-4, atol=1e-4)


def test_vanilla_and_mst_train_identically_on_ragged_data(tmp_path):
    data = ragged_batches(seed=3, micro_batch=2)
    van = tiny_model("llama")
    patched = mst.apply(tiny_model("llama"), mlp_chunk_tokens=37, lm_head_chunk_tokens=29)
    rv = train(van, data, _cfg(), out_dir=tmp_path / "v", use_wandb=False, progress=False)
    rm = train(patched, data, _cfg(), out_dir=tmp_path / "m", use_wandb=False, progress=False)
    torch.testing.assert_close(_f32(rv), _f32(rm))
    torch.testing.assert_close(_f32(rv, "grad_norm"), _f32(rm, "grad_norm"))
    for pv, pm in zip(van.parameters(), patched.parameters()):
        torch.testing.assert_close(pv, pm)
