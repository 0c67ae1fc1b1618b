"""Held-out perplexity at a given context length, and lm-eval on an in-memory (optionally MsT-patched) model.

``window_batches`` cuts a held-out token stream into non-overlapping windows of ``context`` tokens and
``heldout_perplexity`` averages the next-token loss over them (or over any batches, e.g. held-out instruction
data). To compare two context lengths on exactly the same tokens, pass ``score_grid`` = the shorter context:
positions that are a multiple of it (the first token of every short window, which has no context there) are left
out for every context, so both numbers average the same set of predictions. The loss comes from
the model's own forward with ``labels`` and ``num_items_in_batch=1`` (= the token sum), so an ``mst.apply``-patched
model evaluates through its chunked LM head without building S x V logits.

``run_lm_eval`` wraps lm-eval 0.4's ``HFLM`` around a model object (docs/environment.md §5): lm-eval calls the model
without labels, which an MsT-patched model serves with its normal logits.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

IGNORE_INDEX = -100


def window_batches(tokens: np.ndarray, context: int, *, score_grid: int | None = None,
                   batch_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """Non-overlapping ``context``-token windows of ``tokens`` as {"input_ids", "labels"} batches (the tail shorter
    than a window is dropped); with ``score_grid`` (a divisor of ``context``), labels at multiples of it are -100."""
    if score_grid is not None and context % score_grid:
        raise ValueError(f"context {context} must be a multiple of score_grid {score_grid}")
    n_windows = len(tokens) // context
    if n_windows == 0:
        raise ValueError(f"{len(tokens)} held-out tokens are fewer than one window of {context}")
    ids = torch.from_numpy(np.asarray(tokens[:n_windows * context], dtype=np.int64)).view(n_windows, context)
    labels = ids.clone()
    if score_grid is not None:
        labels[:, ::score_grid] = IGNORE_INDEX  # window-relative = global positions: windows start on the grid
    return [{"input_ids": ids[s:s + batch_size], "labels": labels[s:s + batch_size]}
            for s in range(0, n_windows, batch_size)]


@torch.no_grad()
def heldout_perplexity(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict:
    """{"loss", "ppl", "tokens"}: token-weighted next-token loss of ``model`` over ``batches`` (dicts with
    ``input_ids``, ``labels`` and optionally ``attention_mask``), in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            total += float(model(**batch, num_items_in_batch=1).loss)
            count += int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no scored token in the held-out batches")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss), "tokens": count}


def run_lm_eval(model: nn.Module, tokenizer, tasks: list[str], include_path: str | Path, *,
                max_length: int | None = None, batch_size: int = 4, limit: int | None = None) -> dict:
    """Evaluate ``model`` on local lm-eval ``tasks`` (YAMLs under ``include_path``); returns {task: {metric: value}}
    with lm-eval's metric names (e.g. ``acc,none``), stderr entries dropped."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device),
                  max_length=max_length)
        out = simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(include_path)),
                              limit=limit, log_samples=False)
    finally:
        model.train(was_training)
    return {task: {k: v for k, v in metrics.items() if "," in k and "stderr" not in k}
            for task, metrics in out["results"].items()}
