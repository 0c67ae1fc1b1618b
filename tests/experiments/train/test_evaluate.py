"""experiments.train.evaluate: held-out windows, perplexity equal for vanilla and MsT-patched models, lm-eval after apply."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mst
from experiments.train import heldout_perplexity, run_lm_eval, window_batches
from tests.utils import VOCAB, tiny_model

TASKS = Path(__file__).resolve().parents[3] / "experiments" / "table7" / "tasks"


def test_window_batches_and_score_grid():
    tokens = np.arange(100, dtype=np.uint16)
    batches = window_batches(tokens, 32, score_grid=16, batch_size=2)
    assert [b["input_ids"].shape for b in batches] == [(2, 32), (1, 32)]  # 3 windows, tail of 4 dropped
    labels = torch.cat([b["labels"] for b in batches])
    assert (labels[:, [0, 16]] == -100).all() and (labels[:, 1:16] >= 0).all()
    with pytest.raises(ValueError, match="multiple of score_grid"):
        window_batches(tokens, 24, score_grid=16)
    with pytest.raises(ValueError, match="fewer than one window"):
        window_batches(tokens, 128)


def test_same_scored_tokens_at_two_contexts():
    tokens = np.arange(256, dtype=np.uint16)
    short = torch.cat([b["labels"] for b in window_batches(tokens, 32, score_grid=32)]).view(-1)
    long = torch.cat([b["labels"] for b in window_batches(tokens, 128, score_grid=32)]).view(-1)
    assert torch.equal(short, long)


def test_heldout_perplexity_matches_logits_and_mst():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (200,), generator=gen).numpy()
    model = tiny_model("llama")
    batches = window_batches(tokens, 64, score_grid=32)
    out = heldout_perplexity(model, batches)
    with torch.no_grad():
        nll, n = 0.0, 0
        for b in batches:
            logits = model(input_ids=b["input_ids"]).logits[:, :-1]
            y = b["labels"][:, 1:]
            nll += float(F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1), reduction="sum"))
            n += int((y != -100).sum())
    assert out["tokens"] == n == 3 * 62
    torch.testing.assert_close(out["loss"], nll / n)
    patched = heldout_perplexity(mst.apply(model, mlp_chunk_tokens=16, lm_head_chunk_tokens=24), batches)
    torch.testing.assert_close(torch.tensor(patched["loss"]), torch.tensor(out["loss"]))
    assert model.training  # the training mode is restored


@pytest.mark.slow
def test_lm_eval_identical_after_mst_apply():
    """lm-eval (HFLM around the model object) gives the same numbers before and after mst.apply."""
    from experiments.data import CorpusMissingError, gpt2_tokenizer
    try:
        tok = gpt2_tokenizer()
    except CorpusMissingError as e:
        pytest.skip(str(e))
    model = tiny_model("llama")
    model.resize_token_embeddings(len(tok))
    tasks = ["t7_heldout_ppl", "t7_next_verse"]
    plain = run_lm_eval(model, tok, tasks, TASKS, max_length=128, batch_size=8, limit=4)
    patched = run_lm_eval(mst.apply(model, mlp_chunk_tokens=16, lm_head_chunk_tokens=24), tok, tasks, TASKS,
                          max_length=128, batch_size=8, limit=4)
    assert set(plain) == set(tasks)
    for task in tasks:
        for metric, value in plain[task].items():
            torch.testing.assert_close(torch.tensor(patched[task][metric]), torch.tensor(value))
