"""A small, exact training loop: AdamW, gradient accumulation, global-norm clipping, constant LR, resume.

Defaults are the paper's Table 7 recipe (paper.md §Table 7): AdamW, weight decay 0.001, clipping 1.0, constant LR
1e-4, micro-batch 1 x 16 accumulation. One optimizer step:
1. fetch micro-batches ``step * grad_accum ... + grad_accum - 1`` from the stateless schedule (``micro_order=
   "reverse"`` visits them backwards: the same math in another floating-point summation order of the gradients,
   the run-to-run noise probe of the bf16 comparison; it needs grad_accum >= 3, as a sum of two is commutative);
2. count the predicted tokens of the whole step and pass it as ``num_items_in_batch``, so each micro-batch loss is
   its token sum / step tokens and the accumulated gradient is that of the step's token mean (right also for
   variable-length, padded instruction data);
3. backward per micro-batch, clip the global grad norm, AdamW step, zero grads;
4. log {step, loss, grad_norm, tokens, step_time_s, tokens_per_s[, peak_mem_gib]} and checkpoint every
   ``ckpt_every`` steps and at the end.
A run with an existing checkpoint in ``out_dir`` resumes from it and continues the same curve.
Works the same for vanilla and ``mst.apply``-patched models (both return the loss for ``labels``).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .run_log import RunLog

IGNORE_INDEX = -100


@dataclass
class TrainConfig:
    """Optimisation settings (defaults: the paper's Table 7 recipe)."""

    steps: int
    grad_accum: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.001
    clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    micro_order: str = "forward"  # or "reverse"
    ckpt_every: int = 0  # 0: checkpoint only at the end

    def __post_init__(self):
        if self.steps < 1 or self.grad_accum < 1:
            raise ValueError(f"steps and grad_accum must be >= 1, got {self.steps}, {self.grad_accum}")
        if self.micro_order not in ("forward", "reverse"):
            raise ValueError(f"micro_order must be 'forward' or 'reverse', got {self.micro_order!r}")
        if self.ckpt_every < 0:
            raise ValueError(f"ckpt_every must be >= 0, got {self.ckpt_every}")


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights and biases excluded, as HF Trainer does)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)


def _predicted_tokens(batch: dict[str, torch.Tensor]) -> int:
    # HF's causal loss shifts labels left by one: the first label of each row is never predicted
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())


def train(model: nn.Module, micro_batches: Callable[[int], dict[str, torch.Tensor]], cfg: TrainConfig, *,
          out_dir: str | Path, name: str = "run", use_wandb: bool = True, stop_after: int | None = None,
          progress: bool = True, run_config: dict | None = None) -> list[dict]:
    """Train ``model`` for ``cfg.steps`` optimizer steps (resuming from ``out_dir/checkpoint.pt`` if present).

    ``micro_batches(g)`` returns micro-batch number g as a dict with ``input_ids`` and ``labels`` (and optionally
    ``attention_mask``). ``stop_after`` ends the call after that many total steps, as if the job were killed there
    (only the steps up to its last checkpoint survive; for resume tests). Returns the log rows of the whole run
    (restored + new).
    """
    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    model.train()
    opt = make_optimizer(model, cfg)
    ckpt = out_dir / CHECKPOINT_NAME
    start, wandb_id = 0, None
    if ckpt.exists():
        state = load_checkpoint(ckpt, model=model, optimizer=opt)
        start, wandb_id = state["step"], state["extra"].get("wandb_id")
    log = RunLog(out_dir, name, {**asdict(cfg), **(run_config or {})}, use_wandb=use_wandb,
                 resume_step=start if ckpt.exists() else None, wandb_id=wandb_id)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc=name, disable=not progress, leave=False)
    for step in bar:
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        order = range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum)
        batches = [micro_batches(g) for g in (reversed(order) if cfg.micro_order == "reverse" else order)]
        n_items = sum(_predicted_tokens(b) for b in batches)
        loss = torch.zeros((), dtype=torch.float64, device=device)
        for batch in batches:
            out = model(**{k: v.to(device) for k, v in batch.items()}, num_items_in_batch=n_items)
            out.loss.backward()
            loss += out.loss.detach().double()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        n_input = sum(b["input_ids"].numel() for b in batches)
        row = {"step": step + 1, "loss": loss.item(), "grad_norm": float(grad_norm), "tokens": n_items,
               "step_time_s": seconds, "tokens_per_s": n_input / seconds}
        if device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 1024 ** 3
        log.log(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
        done = step + 1
        if done == cfg.steps or (cfg.ckpt_every and done % cfg.ckpt_every == 0):
            save_checkpoint(ckpt, model=model, optimizer=opt, step=done, extra={"wandb_id": log.wandb_id})
    bar.close()
    log.finish({"final_loss": log.rows[-1]["loss"]} if log.rows else None)
    return log.rows
