"""A small, exact training loop: AdamW, gradient accumulation, global-norm clipping, constant LR, resume.

Defaults are the paper's Table 7 recipe (docs/paper.md §1 Table 7): AdamW, weight decay 0.001, clipping 1.0, constant LR
1e-4, micro-batch 1 x 16 accumulation. One optimizer step:
1. fetch micro-batches ``step * accumulation_steps ... + accumulation_steps - 1`` from the stateless schedule (``micro_order=
   "reverse"`` visits them backwards: the same math in another floating-point summation order of the gradients,
   the run-to-run noise probe of the bf16 comparison; it needs accumulation_steps >= 3, as a sum of two is commutative);
2. count the predicted tokens of the whole step and pass it as ``num_items_in_batch``, so each micro-batch loss is
   its token sum / step tokens and the accumulated gradient is that of the step's token mean (right also for
   variable-length, padded instruction data);
3. backward per micro-batch, clip the global grad norm, AdamW step, zero grads;
4. log {step, loss, grad_norm, tokens, step_time_s, tokens_per_s[, peak_mem_gib]} and checkpoint every
   ``ckpt_every`` steps and at the end.
A run with an existing checkpoint in ``out_dir`` resumes from it and continues the same curve, but only when the
checkpoint was written by the same configuration: each checkpoint stores ``run_identity`` (the ``TrainConfig``, the
caller's ``run_config``, the model's class, HF config, dtype and ``mst.apply`` options), and any other checkpoint is
refused with ``ResumeMismatchError`` naming the keys that differ (so a re-run with new settings never reports, or
continues, the old run). ``RESUMABLE`` keys may change: ``steps`` (with a constant LR and a stateless data schedule
a longer run continues the same curve; a checkpoint beyond the new ``steps`` is refused) and ``ckpt_every``.
Works the same for vanilla and ``mst.apply``-patched models (both return the loss for ``labels``).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from mst.integrations import options_dict
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, read_checkpoint, save_checkpoint
from .run_log import RunLog

IGNORE_INDEX = -100
RESUMABLE = ("train.steps", "train.ckpt_every")  # run_identity keys a resumed run may change, see the module doc


class ResumeMismatchError(ValueError):
    """The checkpoint in ``out_dir`` is not this run's to continue (another configuration, or past ``steps``)."""


@dataclass
class TrainConfig:
    """Optimisation settings (defaults: the paper's Table 7 recipe)."""

    steps: int
    accumulation_steps: int = 16
    lr: float = 1e-4
    weight_decay: float = 0.001
    clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    micro_order: str = "forward"  # or "reverse"
    ckpt_every: int = 0  # 0: checkpoint only at the end

    def __post_init__(self):
        if self.steps < 1 or self.accumulation_steps < 1:
            raise ValueError(f"steps and accumulation_steps must be >= 1, got {self.steps}, {self.accumulation_steps}")
        if self.micro_order not in ("forward", "reverse"):
            raise ValueError(f"micro_order must be 'forward' or 'reverse', got {self.micro_order!r}")
        if self.ckpt_every < 0:
            raise ValueError(f"ckpt_every must be >= 0, got {self.ckpt_every}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not self.clip > 0:  # inf (no clipping) is allowed, NaN is not
            raise ValueError(f"clip must be > 0 (inf: no clipping), got {self.clip}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights and biases excluded, as HF Trainer does)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)


def _predicted_tokens(batch: dict[str, torch.Tensor]) -> int:
    # HF's causal loss shifts labels left by one: the first label of each row is never predicted
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())


def run_identity(model: nn.Module, cfg: TrainConfig, run_config: dict | None = None) -> dict:
    """What a checkpoint must match to be resumed, as plain JSON data: {"train": the TrainConfig, "run":
    ``run_config`` (the caller's settings the model cannot show, e.g. data, seed, context), "model": class, HF config
    (without the transformers version), parameter dtype, ``mst.apply`` options}. The weights are not part of it:
    they are the checkpoint's."""
    hf_config = getattr(model, "config", None)
    model_id = {"class": type(model).__name__,
                "config": ({k: v for k, v in hf_config.to_dict().items() if k != "transformers_version"}
                           if hasattr(hf_config, "to_dict") else None),
                "dtype": str(next(model.parameters()).dtype), "mst_options": options_dict(model)}
    identity = {"train": asdict(cfg), "run": run_config or {}, "model": model_id}
    return json.loads(json.dumps(identity, sort_keys=True, default=repr))


def _flat(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}, so that a difference is named by its full key."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_resumable(state: dict, identity: dict, cfg: TrainConfig, ckpt: Path) -> None:
    """Raise ResumeMismatchError unless checkpoint ``state`` was written by a run of this identity (up to
    RESUMABLE keys) and is not past ``cfg.steps``; called before anything is restored into the model."""
    howto = f"Use another out_dir for this run, or delete {ckpt.parent} to start it over."
    saved = state["extra"].get("config")
    if saved is None:
        raise ResumeMismatchError(f"{ckpt} has no stored configuration (written by an older mst, or not by "
                                  f"experiments.train.train), so it cannot be checked against this run. {howto}")
    old, new = _flat(saved), _flat(identity)
    absent = object()
    differ = [k for k in sorted(old.keys() | new.keys())
              if k not in RESUMABLE and old.get(k, absent) != new.get(k, absent)]
    if differ:
        def show(d: dict, key: str) -> str:
            return repr(d[key])[:80] if key in d else "(absent)"

        lines = "".join(f"\n  {k}: checkpoint {show(old, k)}, now {show(new, k)}" for k in differ)
        raise ResumeMismatchError(f"{ckpt} was written by a run with another configuration; resuming it would "
                                  f"train a mix of the two:{lines}\n{howto} (Only {', '.join(RESUMABLE)} may "
                                  "change on resume.)")
    if state["step"] > cfg.steps:
        raise ResumeMismatchError(f"{ckpt} is at step {state['step']}, beyond steps={cfg.steps} of this run: a "
                                  f"shorter run cannot be resumed from it. {howto}")


def _resume(ckpt: Path, identity: dict, cfg: TrainConfig, model: nn.Module,
            optimizer: torch.optim.Optimizer) -> tuple[int, str | None]:
    """Check, then restore the checkpoint (read once); returns (finished steps, wandb run id)."""
    state = read_checkpoint(ckpt)
    _check_resumable(state, identity, cfg, ckpt)
    return load_checkpoint(state, model=model, optimizer=optimizer)["step"], state["extra"].get("wandb_id")


def train(model: nn.Module, micro_batches: Callable[[int], dict[str, torch.Tensor]], cfg: TrainConfig, *,
          out_dir: str | Path, name: str = "run", use_wandb: bool = True, stop_after: int | None = None,
          progress: bool = True, run_config: dict | None = None) -> list[dict]:
    """Train ``model`` for ``cfg.steps`` optimizer steps (resuming from ``out_dir/checkpoint.pt`` if present and
    written by the same configuration, else ``ResumeMismatchError``: see the module doc).

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
    identity = run_identity(model, cfg, run_config)
    start, wandb_id = _resume(ckpt, identity, cfg, model, opt) if ckpt.exists() else (0, None)
    log = RunLog(out_dir, name, {**asdict(cfg), **(run_config or {})}, use_wandb=use_wandb,
                 resume_step=start if ckpt.exists() else None, wandb_id=wandb_id)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(range(start, end), initial=start, total=cfg.steps, desc=name, disable=not progress, leave=False)
    for step in bar:
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        order = range(step * cfg.accumulation_steps, (step + 1) * cfg.accumulation_steps)
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
            save_checkpoint(ckpt, model=model, optimizer=opt, step=done,
                            extra={"wandb_id": log.wandb_id, "config": identity})
    bar.close()
    log.finish({"final_loss": log.rows[-1]["loss"]} if log.rows else None)
    return log.rows
