"""Optimizer-in-backward: each parameter is updated, and its gradient freed, as soon as its gradient is complete.

A normal step keeps every gradient alive until ``optimizer.step()`` (one full copy of the weights) and AdamW's
for-loop adds per-parameter temporaries on top. The paper's max-length runs (Tables 2, 3 and 9) fuse the update into
backward instead, AdaLomo-style: only the gradients of the layers currently in backward exist. Here every trainable
parameter gets its own ``torch.optim.AdamW`` stepped from a ``register_post_accumulate_grad_hook``, so the update is
exactly the one a single AdamW over all parameters would make (AdamW's math is per-parameter).

Gradient accumulation: with ``accumulation_steps=k`` a parameter steps only on every k-th accumulation of its
gradient (the last micro-step of the window); the loss must be scaled by 1/k as usual. Gradients of the earlier
micro-steps stay in ``.grad`` in between, so accumulation gives back the gradient memory (the paper's Table 4).

Not compatible: global-norm gradient clipping (``clip_grad_norm_`` needs every gradient before any update, which is
exactly what this removes; clip per parameter or not at all), LR schedulers attached to one optimizer (call
``handle.set_lr`` instead), and AMP's ``GradScaler`` (it unscales and checks for inf over all gradients first).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


class OptimizerInBackward:
    """Handle returned by ``optimizer_in_backward``: the per-parameter optimizers, their hooks, and checkpoints."""

    def __init__(self, model: nn.Module, accumulation_steps: int, **adamw_kwargs: Any):
        self.accumulation_steps = accumulation_steps
        self.names: list[str] = []
        self.optimizers: list[torch.optim.Optimizer] = []  # one per trainable parameter, in named_parameters order
        self.micro_steps: list[int] = []  # accumulations seen per parameter (steps when a multiple of k)
        self._hooks = []
        for name, param in model.named_parameters():  # tied weights appear once
            if not param.requires_grad:
                continue
            index = len(self.optimizers)
            self.names.append(name)
            self.optimizers.append(torch.optim.AdamW([param], **adamw_kwargs))
            self.micro_steps.append(0)
            self._hooks.append(param.register_post_accumulate_grad_hook(
                lambda p, i=index: self._on_grad(i, p)))
        if not self.optimizers:
            raise ValueError("optimizer_in_backward: the model has no trainable parameters")

    def _on_grad(self, index: int, param: torch.Tensor) -> None:
        self.micro_steps[index] += 1
        if self.micro_steps[index] % self.accumulation_steps == 0:
            self.optimizers[index].step()
            param.grad = None  # freed now, not at the end of backward

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every per-parameter optimizer (the scheduler hook point)."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    def remove(self) -> None:
        """Detach the hooks: later backwards only accumulate ``.grad`` again. Optimizer state is kept."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def state_dict(self) -> dict:
        """Per-parameter optimizer states keyed by parameter name, plus the micro-step counters."""
        return {"accumulation_steps": self.accumulation_steps,
                "optimizers": {n: o.state_dict() for n, o in zip(self.names, self.optimizers)},
                "micro_steps": dict(zip(self.names, self.micro_steps))}

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()`` taken from a handle over the same parameter names."""
        missing = set(self.names) ^ set(state["optimizers"])
        if missing:
            raise ValueError(f"optimizer_in_backward: state does not match the parameters (differ: {sorted(missing)})")
        for i, name in enumerate(self.names):
            self.optimizers[i].load_state_dict(state["optimizers"][name])
            self.micro_steps[i] = int(state["micro_steps"][name])


def optimizer_in_backward(model: nn.Module, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                          eps: float = 1e-8, weight_decay: float = 1e-2, accumulation_steps: int = 1,
                          **adamw_kwargs: Any) -> OptimizerInBackward:
    """Fuse AdamW into backward for every trainable parameter of ``model``; returns the handle.

    After ``loss.backward()`` the parameters are already updated and their ``.grad`` is None (on the last
    micro-step of each ``accumulation_steps`` window). Numerically equal to ``torch.optim.AdamW`` with the same
    arguments. Extra keyword arguments go to each ``torch.optim.AdamW`` (e.g. ``foreach``, ``fused``, ``amsgrad``).
    Do not call ``handle.optimizers[i].step()`` yourself, and do not clip gradients by global norm (see module doc).
    """
    if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be a positive integer, got {accumulation_steps!r}")
    return OptimizerInBackward(model, accumulation_steps, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                               **adamw_kwargs)
