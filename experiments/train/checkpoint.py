"""Training checkpoints that make a resumed run continue the same curve.

A checkpoint holds what the next step depends on: model and optimizer state, the number of finished steps and
the RNG states (the data schedule is stateless, see ``experiments.data.batches``). It is written to a temporary file and
renamed, so a run killed while saving leaves the previous checkpoint intact. The model's ``state_dict`` is the
same with and without ``mst.apply`` (MsT patches forwards, not parameters), so a checkpoint moves freely between
vanilla and MsT models.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..results import atomic_output

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    extra: dict | None = None) -> Path:
    """Atomically write the training state after ``step`` finished steps."""
    path = Path(path)
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "rng_cpu": torch.get_rng_state(),
             "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
             "extra": extra or {}}
    with atomic_output(path) as tmp:
        torch.save(state, tmp)
    return path


def read_checkpoint(path: str | Path) -> dict:
    """The whole checkpoint (tensors on CPU), so that ``step`` and ``extra`` can be checked before restoring it
    with ``load_checkpoint`` (which then needs no second read)."""
    return torch.load(Path(path), map_location="cpu", weights_only=False)


def load_checkpoint(checkpoint: str | Path | dict, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore a checkpoint (a path, or what ``read_checkpoint`` returned) into ``model`` (and ``optimizer``);
    returns {"step", "extra"}."""
    state = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return {"step": state["step"], "extra": state["extra"]}
