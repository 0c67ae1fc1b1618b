"""experiments.train.loop: accumulation semantics, accumulation order, optimizer groups, vanilla == MsT on ragged data."""
import pytest
import torch

import mst
from experiments.train import TrainConfig, make_optimizer, train
from tests.convergence.synthetic import ragged_batches, step_gradients
from tests.utils import assert_exact, tiny_model


def _as(rows, dtype=torch.float32, key="loss"):
    """A logged metric as a tensor of the run's dtype, so assert_close applies that dtype's tolerances."""
    return torch.tensor([r[key] for r in rows], dtype=dtype)


def _cfg(**kw):
    return TrainConfig(**{"steps": 3, "accumulation_steps": 2, "lr": 1e-3, **kw})


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


def _pairs(one):
    """The schedule of ``one`` regrouped: micro-batch g holds ``one``'s rows 2g and 2g + 1."""
    def pairs(g):
        a, b = one(2 * g), one(2 * g + 1)
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return pairs


def _assert_same_training(make_a, data_a, cfg_a, make_b, data_b, cfg_b, tmp_path):
    """Two runs are the same training: every step's loss and gradient norm at fp32 tolerance (the loss is an fp32
    computation in both, as HF upcasts the logits), the first step's gradients at fp32 tolerance, and the weights a
    float64 run trains to a tenth of one AdamW step. Why not fp32 weights: Adam turns a rounding-level difference in
    a near-zero gradient element into an lr-sized weight difference, and where that happens depends on the
    machine's BLAS kernels (fp32: 1.3e-5 on one machine). float64 runs measured 6e-8 = lr / 16,000 at most (only
    the loss is fp32 there), so lr / 10 keeps the check machine-independent; a 2x gradient still fails at step 1."""
    for dtype in (torch.float32, torch.float64):
        runs = []
        for i, (make, data, cfg) in enumerate(((make_a, data_a, cfg_a), (make_b, data_b, cfg_b))):
            model = make(dtype)
            with step_gradients() as grads:
                rows = train(model, data, cfg, out_dir=tmp_path / f"{dtype}-{i}", use_wandb=False, progress=False)
            runs.append((model, rows, grads))
        (ma, ra, ga), (mb, rb, gb) = runs
        assert [r["tokens"] for r in ra] == [r["tokens"] for r in rb]
        torch.testing.assert_close(_as(rb), _as(ra))  # fp32 tolerance: both losses are fp32 (HF upcasts logits)
        if dtype == torch.float32:
            for a, b in zip(ga[0], gb[0]):
                assert_exact(b, a, "step-1 gradient")
        else:
            torch.testing.assert_close(_as(rb, key="grad_norm"), _as(ra, key="grad_norm"))
            for (name, pa), pb in zip(ma.named_parameters(), mb.parameters()):
                torch.testing.assert_close(pb, pa, atol=cfg_a.lr / 10, rtol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_step_loss_is_the_token_mean_over_accumulated_micro_batches(tmp_path):
    """2 micro-batches of 1 row == 1 micro-batch of the same 2 rows (ragged rows: needs num_items_in_batch)."""
    one = ragged_batches(seed=1)
    _assert_same_training(lambda dtype: tiny_model("llama", dtype=dtype), one, _cfg(),
                          lambda dtype: tiny_model("llama", dtype=dtype), _pairs(one), _cfg(accumulation_steps=1), tmp_path)


def test_reverse_order_same_first_step(tmp_path):
    data = ragged_batches(seed=2)  # accumulation_steps 3: a sum of two would be commutative
    fwd = train(tiny_model("llama"), data, _cfg(accumulation_steps=3), out_dir=tmp_path / "f", use_wandb=False, progress=False)
    rev = train(tiny_model("llama"), data, _cfg(accumulation_steps=3, micro_order="reverse"), out_dir=tmp_path / "r",
                use_wandb=False, progress=False)
    torch.testing.assert_close(_as(fwd[:1]), _as(rev[:1]))
    torch.testing.assert_close(_as(fwd), _as(rev), rtol=1e-4, atol=1e-4)


def test_vanilla_and_mst_train_identically_on_ragged_data(tmp_path):
    data = ragged_batches(seed=3, micro_batch=2)
    _assert_same_training(
        lambda dtype: tiny_model("llama", dtype=dtype), data, _cfg(),
        lambda dtype: mst.apply(tiny_model("llama", dtype=dtype), mlp_chunk_tokens=37, lm_head_chunk_tokens=29),
        data, _cfg(), tmp_path)
