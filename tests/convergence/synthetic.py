"""Synthetic micro-batch schedules for the training-loop tests (importable as ``tests.convergence.synthetic``)."""
import torch

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
