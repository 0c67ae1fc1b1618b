"""The training strategies the paper compares, and one training step that the experiments time and measure.

Strategy names are shared by the planner, the length search and every experiment:
    vanilla      plain HF model (no checkpointing)
    ac           activation checkpointing per decoder layer ("activation recomputation" in the paper)
    mst          MsT: mini-sequence MLP + chunked LM-head/loss, with activation checkpointing (the paper's default)
    mst_offload  MsT + checkpointed layer inputs offloaded to CPU (paper's Limitations section; no paper number)
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..integrations import apply
from .backward_optimizer import optimizer_in_backward

STRATEGIES: dict[str, dict | None] = {
    "vanilla": None,
    "ac": dict(mlp=False, lm_head=False),
    "mst": {},
    "mst_offload": dict(offload_checkpoints=True),
}
OPTIMIZERS = ("adamw", "adamw_in_backward")


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")


def prepare(model: nn.Module, strategy: str, quantization: str | None = None, **mst_options) -> nn.Module:
    """Put ``model`` in training mode with ``strategy`` applied (extra options go to ``mst.apply``).

    ``quantization`` ("int8" | "nf4"): first freeze the weights at that precision and train LoRA adapters
    instead (``mst.memory.quantization``, the paper's Table 5 rows)."""
    check_strategy(strategy)
    if quantization is not None:
        from .quantization import quantize_for_training  # needs bitsandbytes + peft, imported only when asked

        quantize_for_training(model, quantization)
    model.train()
    options = STRATEGIES[strategy]
    if options is not None:
        apply(model, **{**options, **mst_options})
    return model


def make_train_step(model: nn.Module, *, optimizer: str = "adamw", batch_size: int = 1, accumulation_steps: int = 1,
                    lr: float = 1e-5, device: str | torch.device | None = None
                    ) -> tuple[Callable[[int], torch.Tensor], list]:
    """One optimizer (built once) and a ``step(seq_len)`` closure training on random tokens of that length.

    Memory does not depend on token values. optimizer="adamw": forward/backward ``accumulation_steps``
    micro-batches, then ``AdamW.step`` (gradients live through the whole window, as in the paper's Table 4).
    optimizer="adamw_in_backward": each parameter is updated and its gradient freed as soon as it is accumulated
    (the paper's max-length setting, Tables 2/3). Returns ``(step, track)``; ``track`` lists what
    ``measure_peak`` should attribute (the model and every optimizer holding state).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    if not isinstance(accumulation_steps, int) or isinstance(accumulation_steps, bool) or accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be a positive integer, got {accumulation_steps!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    vocab = model.config.vocab_size
    if optimizer == "adamw":
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, foreach=False)
        track: list = [model, opt]
    else:
        opt = optimizer_in_backward(model, lr=lr, accumulation_steps=accumulation_steps)
        track = [model, *opt.optimizers]

    def step(seq_len: int) -> torch.Tensor:
        loss = None
        for _ in range(accumulation_steps):
            ids = torch.randint(0, vocab, (batch_size, seq_len), device=device)
            loss = model(input_ids=ids, labels=ids).loss
            (loss / accumulation_steps).backward()
            del ids
        if optimizer == "adamw":
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, track
