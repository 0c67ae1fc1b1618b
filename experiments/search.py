"""The experiments' length and batch searches, all on ``mst.memory.length_search`` (doubling or a bracket around a
prediction, then bisection; each trial builds the step, runs a warm-up step and measures one more, and running out
of memory anywhere in it is a failed trial, never a crash).

- ``search_length``: one cell of Tables 2-5: the model is built inside the first trial, so running out of memory
  while building it is a failed trial; on CPU a static probe (a 16-token step: weights, gradients, optimizer state)
  plus the emulated free bytes (``experiments.budget``) is the budget, and the planner's limit for exactly that
  setting seeds the search. A cell whose static probe fails is 0 tokens.
- ``search_batch``: Table 6's largest batch at a budget: the same search over the batch size.
- ``fit_contexts``: Table 7's longest context per strategy within the memory AC needs at context ``start``
  (+0.1%, so re-measuring AC at ``start`` is not decided by allocator noise), capped at ``max_len`` because on CPU
  a step at the context MsT really fits would take too long. The step is Table 7's own (AdamW with the paper's
  weight decay, clipping).
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Callable

import torch
from torch import nn

from mst.memory.length_search import SearchResult, Trial, run_trial, search_max_seq_len
from mst.memory.measure import free_memory
from mst.memory.strategies import prepare

from .train.loop import TrainConfig, make_optimizer

StepFactory = Callable[[int], tuple[Callable[[], object], list]]
PROBE_TOKENS = 16  # the static probe's length: what the model, its gradients and optimizer state need


def _method(device: torch.device) -> str:
    return "rss" if device.type == "cpu" else "tracker"  # RSS makes long CPU searches several times faster


def search_length(make_model: Callable[[], nn.Module], make_step: Callable[[nn.Module], Callable[[int], object]],
                  *, device: torch.device, free_bytes: int | None = None,
                  seed_for_budget: Callable[[int], int] | None = None, expect: int | None = None,
                  on_trial: Callable[[Trial], None] = lambda trial: None) -> dict:
    """Longest sequence whose step fits. ``make_model()`` builds the prepared model (once, in the first trial),
    ``make_step(model)`` returns ``(step(seq_len), track)``. CPU emulation (``free_bytes`` given): the budget is
    the static probe's peak + ``free_bytes`` and ``seed_for_budget(budget)`` seeds the search; otherwise the real
    device decides and ``expect`` seeds it. ``on_trial`` sees every trial, the probe's too."""
    built: list = []  # [(step, track)] once the first trial has built the model

    def factory(seq_len: int):
        if not built:
            built.append(make_step(make_model()))
        step, track = built[0]
        return (lambda: step(seq_len)), track

    budget, granularity, probe = None, 1024, None
    try:
        if free_bytes is not None:
            probe, _ = run_trial(factory, PROBE_TOKENS, None, device, method="rss")
            on_trial(probe)
            if not probe.fits:  # not even the model, its optimizer and a 16-token step
                return {**SearchResult(0, None, str(device)).to_dict(), "seed": None, "static_probe": asdict(probe)}
            budget = int(probe.peak_bytes) + free_bytes
            expect = seed_for_budget(budget) if seed_for_budget else None
            granularity = max(16, (expect or 0) // 32 // 16 * 16)
        result = search_max_seq_len(factory, budget_bytes=budget, device=device, expect=expect,
                                    granularity=granularity, progress=on_trial, warmup_steps=1,
                                    method=_method(device))
    finally:
        built.clear()
        free_memory()
    return {**result.to_dict(), "seed": expect, "static_probe": asdict(probe) if probe else None}


def search_batch(make_step: StepFactory, *, device: torch.device, budget_bytes: int | None, expect: int,
                 max_batch: int = 512) -> SearchResult:
    """Largest batch (``make_step(batch)``) whose step fits ``budget_bytes`` (None: the device), seeded below the
    prediction ``expect``."""
    return search_max_seq_len(make_step, budget_bytes=budget_bytes, device=device, start=max(1, expect // 2),
                              granularity=1, max_len=max_batch, method=_method(device))


def training_step_factory(build: Callable[[], nn.Module], strategy: str, *, micro_batch: int = 1,
                          mst_options: dict | None = None, cfg: TrainConfig | None = None) -> StepFactory:
    """``make_step(seq_len) -> (step, [model, optimizer])`` of Table 7's training step, on random tokens."""
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
        def report(t: Trial, strategy: str = strategy) -> None:
            if progress is not None:
                shown = "OOM" if t.peak_bytes is None else f"{t.peak_bytes / 2 ** 20:.1f} MiB"
                progress(f"{strategy:8s} context {t.seq_len:6d}: {shown} ({'fits' if t.fits else 'over budget'})")

        result = search_max_seq_len(factory[strategy], budget_bytes=budget_bytes, device=device, start=start,
                                    granularity=start if granularity is None else granularity,
                                    max_len=max_len, progress=report)
        longest[strategy] = result.max_seq_len
        trials += [{"strategy": strategy, **vars(t)} for t in result.trials]
    return {"budget_bytes": budget_bytes, "longest": longest, "trials": trials}
