"""Which context length fits one memory budget, per strategy, by measuring real training steps.

The paper's Table 7 compares activation recomputation (AC) at the longest context it fits (8K on an A100-80G) with
MsT at the longest context MsT fits (30K). ``fit_contexts`` does the same with the repo's length search
(``mst.memory.length_search``: doubling from ``start``, then bisection to ``granularity``, each trial one warm-up
step plus one ``measure_peak``-measured step, CUDA OOM = does not fit), capped at ``max_len`` because on CPU a step
at the context MsT really fits would take too long. The step is this package's training step (AdamW with the
paper's weight decay, clipping), on one micro-batch. Without an explicit budget, the budget is AC's measured peak at
``start`` (+0.1%, so re-measuring AC at ``start`` is not decided by allocator noise): "the memory AC needs for
context L".
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..memory.length_search import run_trial, search_max_seq_len
from ..memory.strategies import prepare
from .loop import TrainConfig, make_optimizer


def training_step_factory(build: Callable[[], nn.Module], strategy: str, *, micro_batch: int = 1,
                          mst_options: dict | None = None, cfg: TrainConfig | None = None):
    """``make_step(seq_len) -> (step, [model, optimizer])`` for ``mst.memory.length_search``."""
    cfg = cfg or TrainConfig(steps=1)

    def make_step(seq_len: int):
        model = prepare(build(), strategy, **(mst_options or {}))
        opt = make_optimizer(model, cfg)
        device = next(model.parameters()).device
        gen = torch.Generator().manual_seed(seq_len)
        ids = torch.randint(0, model.config.vocab_size, (micro_batch, seq_len), generator=gen).to(device)  # (B, S)

        def step() -> None:
            model(input_ids=ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step, [model, opt]

    return make_step


def fit_contexts(build: Callable[[], nn.Module], strategies: tuple[str, ...] = ("ac", "mst"), *, start: int,
                 max_len: int, granularity: int | None = None, budget_bytes: int | None = None,
                 reference: str = "ac", micro_batch: int = 1, mst_options: dict | None = None,
                 cfg: TrainConfig | None = None, device: str | torch.device = "cpu",
                 progress: Callable[[str], None] | None = None) -> dict:
    """Longest context in [start, max_len] (multiples of ``granularity``, default ``start``) each strategy fits.

    Returns {"budget_bytes", "longest": {strategy: tokens (0: not even ``start``)},
    "trials": [{"strategy", "seq_len", "fits", "peak_bytes", ...}]}.
    """
    device = torch.device(device)
    factory = {s: training_step_factory(build, s, micro_batch=micro_batch, mst_options=mst_options, cfg=cfg)
               for s in strategies + (reference,)}
    if budget_bytes is None:
        trial, _ = run_trial(factory[reference], start, None, device)
        if trial.peak_bytes is None:
            raise RuntimeError(f"{reference} does not fit even at context {start}: {trial.error}")
        budget_bytes = int(trial.peak_bytes * 1.001)
    longest, trials = {}, []
    for strategy in strategies:
        def report(t, strategy=strategy):
            if progress is not None:
                shown = "OOM" if t.peak_bytes is None else f"{t.peak_bytes / 2 ** 20:.1f} MiB"
                progress(f"{strategy:8s} context {t.seq_len:6d}: {shown} ({'fits' if t.fits else 'over budget'})")

        result = search_max_seq_len(factory[strategy], budget_bytes=budget_bytes, device=device, start=start,
                                    granularity=start if granularity is None else granularity,
                                    max_len=max_len, progress=report)
        longest[strategy] = result.max_seq_len
        trials += [{"strategy": strategy, **vars(t)} for t in result.trials]
    return {"budget_bytes": budget_bytes, "longest": longest, "trials": trials}
