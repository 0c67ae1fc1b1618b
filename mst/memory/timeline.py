"""Memory timeline of one call: the live bytes after every allocation event (the paper's Figures 7-11).

    events = record_timeline(lambda: step(4096), track=[model, *optimizers])
    # [("forward:aten.mm.default", 1234567), ..., ("backward:aten.mm.default", 2345678), ...]

CUDA: the caching allocator's own history (``torch.cuda.memory._record_memory_history`` + ``_snapshot``), the tool
the paper's figures were drawn with; the level starts at ``torch.cuda.memory_allocated()`` and moves with every
``alloc`` / ``free_completed`` of the trace, and the event names the allocating frame. ``snapshot_path`` keeps the
raw snapshot for https://pytorch.org/memory_viz.

CPU has no allocator history, so the dispatch-mode counter the planner traces with (``LiveBytes``,
``mst.memory.live_bytes``) counts the storage bytes every op creates until they die, on top of what ``track``'s
parameters, gradients, buffers and optimizer states hold when the call starts. Its events name the op and the phase:
"backward" while an autograd node runs (so checkpoint recomputes and optimizer-in-backward updates count as
backward), otherwise "forward" before the first backward op and "after_backward" after it (the ``optimizer.step()``
of a plain AdamW step).
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .live_bytes import LiveBytes
from .measure import held_tensors

Tracked = nn.Module | torch.optim.Optimizer


class _LiveBytesLog(LiveBytes):
    """``LiveBytes`` on real tensors, logging (phase:op, held + live bytes) after every op.

    Overrides the dispatch without the parent's answers to ``all()``/``any()`` reads, which stand in for values
    only fake tensors lack: real tensors must read their real values.
    """

    def __init__(self, held: list[torch.Tensor]):
        super().__init__(ignore=held)  # in-place updates of weights and states are not new memory
        self.held = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}.values())
        self.events: list[tuple[str, int]] = []
        self.backward_seen = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, func)
        if torch._C._current_autograd_node() is not None:
            self.backward_seen, phase = True, "backward"
        else:
            phase = "after_backward" if self.backward_seen else "forward"
        self.events.append((f"{phase}:{func}", self.held + self.current))
        return out


def _record_cuda(fn: Callable[[], object], device: torch.device, snapshot_path: str | Path | None
                 ) -> list[tuple[str, int]]:
    torch.cuda.synchronize(device)
    level = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    try:
        fn()
        torch.cuda.synchronize(device)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    if snapshot_path is not None:
        Path(snapshot_path).write_bytes(pickle.dumps(snapshot))
    events = []
    for entry in snapshot["device_traces"][device.index if device.index is not None else torch.cuda.current_device()]:
        sign = {"alloc": 1, "free_completed": -1}.get(entry["action"])
        if sign is None:
            continue
        level += sign * entry["size"]
        frames = entry.get("frames") or [{"name": "?"}]
        events.append((f"{entry['action']}:{frames[0]['name']}", level))
    return events


def record_timeline(fn: Callable[[], object], track: Iterable[Tracked] = (), device: str | torch.device = "cpu",
                    snapshot_path: str | Path | None = None) -> list[tuple[str, int]]:
    """Run ``fn()`` once and return ``[(event, live bytes after it), ...]`` in order (see the module docstring).

    ``track``: on CPU, the modules and optimizers whose tensors exist before the call (their bytes are the
    starting level; on CUDA the allocator knows it). ``snapshot_path``: CUDA only, where to pickle the snapshot.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _record_cuda(fn, device, snapshot_path)
    log = _LiveBytesLog(list(held_tensors(track)))
    with log:
        fn()
    return log.events
