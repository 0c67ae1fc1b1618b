"""Vanilla vs MsT training on real text (GPT-2 BPE, KJV + Python docs): same curve, same weights.

fp32: every step's loss and the first step's gradients agree to ``assert_close``'s fp32 defaults. The trained weights
are compared in float64 runs, to a tenth of one AdamW step: Adam divides each gradient element by its own running
scale, so a rounding-level difference in a near-zero element moves that weight by up to lr, and how often that
happens depends on the machine's BLAS kernels (fp32: 1 of 6.4M embedding entries differed by 1.5e-5 after 3 steps on
one machine, 1.3e-5 on another). In float64 only the loss itself stays fp32 (HF and mst both upcast logits to fp32,
which for float64 is a downcast): measured 1.1e-6 = lr / 900 at most, so lr / 10 keeps a 90x margin.
bf16: agree to bf16 tolerances (Liger's convergence-test levels); the experiment compares bf16 against vanilla's
own noise instead.
"""
import pytest
import torch

from experiments.data import CorpusMissingError, MicroBatches, gpt2_tokenizer, packed_dataset
from mst.memory.strategies import prepare
from experiments.models import build_model, preset_config
from experiments.train import TrainConfig, train
from tests.convergence.synthetic import ragged_batches, step_gradients
from tests.utils import assert_exact, tiny_model

SEQ = 64
MST_OPTIONS = dict(mlp_chunk_tokens=24, lm_head_chunk_tokens=40)  # uneven chunks: 64 = 2 x 24 + 16, 40 + 24
LR = 1e-3


@pytest.fixture(scope="module")
def corpus_batches():
    try:
        tok = gpt2_tokenizer()
        return MicroBatches(packed_dataset("kjv+pydocs", "train", tok, SEQ), micro_batch=1, seed=0)
    except CorpusMissingError as e:
        pytest.skip(str(e))


def _run(strategy, batches, tmp_path, dtype=torch.float32, steps=3):
    """(model, losses, each step's gradients) of a ``strategy`` run."""
    model = prepare(build_model(preset_config("tiny-llama"), dtype=dtype, seed=0), strategy, **MST_OPTIONS)
    with step_gradients() as grads:
        rows = train(model, batches, TrainConfig(steps=steps, accumulation_steps=2, lr=LR),
                     out_dir=tmp_path / f"{strategy}-{dtype}", use_wandb=False, progress=False)
    return model, torch.tensor([r["loss"] for r in rows], dtype=dtype), grads


def test_fp32_vanilla_and_mst_curves_and_gradients_coincide(corpus_batches, tmp_path):
    van, loss_v, grads_v = _run("vanilla", corpus_batches, tmp_path)
    ms, loss_m, grads_m = _run("mst", corpus_batches, tmp_path)
    assert loss_v[-1] < loss_v[0]  # it learns
    torch.testing.assert_close(loss_m, loss_v)
    for (name, _), gv, gm in zip(van.named_parameters(), grads_v[0], grads_m[0]):
        assert_exact(gm, gv, f"step-1 gradient of {name}")


def test_float64_vanilla_and_mst_train_the_same_weights(corpus_batches, tmp_path):
    van, loss_v, _ = _run("vanilla", corpus_batches, tmp_path, dtype=torch.float64)
    ms, loss_m, _ = _run("mst", corpus_batches, tmp_path, dtype=torch.float64)
    torch.testing.assert_close(loss_m.float(), loss_v.float())  # both losses are fp32 computations (HF upcasts)
    for (name, pv), pm in zip(van.named_parameters(), ms.parameters()):
        torch.testing.assert_close(pm, pv, atol=LR / 10, rtol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_bf16_vanilla_and_mst_curves_agree(tmp_path):
    """bf16 weights (CPU bf16 matmuls are slow, so the small test model on synthetic ragged batches)."""
    losses = []
    for strategy in ("vanilla", "mst"):
        model = prepare(tiny_model("llama", dtype=torch.bfloat16), strategy, **MST_OPTIONS)
        rows = train(model, ragged_batches(seed=7, micro_batch=2), TrainConfig(steps=4, accumulation_steps=3, lr=LR),
                     out_dir=tmp_path / strategy, use_wandb=False, progress=False)
        losses.append(torch.tensor([r["loss"] for r in rows], dtype=torch.float32))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-2, rtol=5e-2)
