"""Vanilla vs MsT training on real text (GPT-2 BPE, KJV + Python docs): same curve, same weights.

fp32: every step's loss agrees to ``assert_close``'s fp32 defaults; final weights to a tenth of one AdamW step (Adam
divides each gradient element by its own running scale, so a rounding-level difference in a near-zero gradient
element can move that weight by up to lr; 1 of 6.4M embedding entries differs by 1.5e-5 after 3 steps).
bf16: agree to bf16 tolerances (Liger's convergence-test levels); the experiment compares bf16 against vanilla's
own noise instead.
"""
import pytest
import torch

from mst.data import CorpusMissingError, MicroBatches, gpt2_tokenizer, packed_dataset
from mst.memory.strategies import prepare
from mst.train import TrainConfig, build_model, train
from tests.convergence.synthetic import ragged_batches
from tests.utils import tiny_model

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
    model = prepare(build_model("tiny-llama", dtype=dtype, seed=0), strategy, **MST_OPTIONS)
    rows = train(model, batches, TrainConfig(steps=steps, grad_accum=2, lr=LR), out_dir=tmp_path / strategy,
                 use_wandb=False, progress=False)
    return model, torch.tensor([r["loss"] for r in rows], dtype=torch.float32)


def test_fp32_vanilla_and_mst_curves_and_weights_coincide(corpus_batches, tmp_path):
    van, loss_v = _run("vanilla", corpus_batches, tmp_path)
    ms, loss_m = _run("mst", corpus_batches, tmp_path)
    assert loss_v[-1] < loss_v[0]  # it learns
    torch.testing.assert_close(loss_m, loss_v)
    for (name, pv), pm in zip(van.named_parameters(), ms.parameters()):
        torch.testing.assert_close(pm, pv, atol=LR / 10, rtol=1.3e-6, msg=lambda m: f"{name}: {m}")


def test_bf16_vanilla_and_mst_curves_agree(tmp_path):
    """bf16 weights (CPU bf16 matmuls are slow, so the small test model on synthetic ragged batches)."""
    losses = []
    for strategy in ("vanilla", "mst"):
        model = prepare(tiny_model("llama", dtype=torch.bfloat16), strategy, **MST_OPTIONS)
        rows = train(model, ragged_batches(seed=7, micro_batch=2), TrainConfig(steps=4, grad_accum=3, lr=LR),
                     out_dir=tmp_path / strategy, use_wandb=False, progress=False)
        losses.append(torch.tensor([r["loss"] for r in rows], dtype=torch.float32))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-2, rtol=5e-2)
