"""Shared helpers of the training-loop tests (importable as ``tests.convergence.synthetic``): synthetic micro-batch
schedules, and the gradients of each optimizer step."""
import contextlib

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tests.utils import VOCAB


def ragged_batches(seed: int = 0, micro_batch: int = 1, vocab: int = VOCAB, seq: int = 96):
    """g -> micro-batch g: right-padded rows of 40..96 real tokens, the first third of each labelled -100 (a
    "prompt"), so micro-batches hold different numbers of predicted tokens (exercises ``num_items_in_batch``)."""
    def get(g: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed * 1000 + g)
        n = int(torch.randint(40, seq + 1, (1,), generator=gen))
        ids = torch.randint(0, vocab, (micro_batch, seq), generator=gen)  # (B, S)
        labels, mask = ids.clone(), torch.ones_like(ids)
        labels[:, :n // 3] = -100
        labels[:, n:], mask[:, n:] = -100, 0
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
    return get


@contextlib.contextmanager
def step_gradients():
    """Yields a list that receives, at every optimizer step, a copy of each parameter's (clipped) gradient.

    Why: Adam divides each gradient element by its own running scale, so a rounding-level difference in a
    near-zero element becomes an lr-sized difference in the weights (what made trained-weight comparisons depend on
    the machine's BLAS). The gradients of the first step are the loop's math at fp32 tolerance; later steps see
    weights that already differ by such amounts."""
    steps: list[list[torch.Tensor]] = []

    def hook(optimizer, args, kwargs):
        steps.append([p.grad.detach().clone() for group in optimizer.param_groups for p in group["params"]
                      if p.grad is not None])

    handle = register_optimizer_step_pre_hook(hook)
    try:
        yield steps
    finally:
        handle.remove()
