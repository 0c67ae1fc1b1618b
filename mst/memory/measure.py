"""Measure the peak memory of a training step, with a breakdown, on CUDA or CPU.

The same function serves both devices so CPU results (tests, the scaled-down experiments) and GPU results are the
same kind of number. The breakdown comes from ``torch.distributed._tools.mem_tracker.MemTracker`` (tensor
storages attributed to parameters, gradients, optimizer state, activations, temporaries), which counts exactly
what tensors hold; on CUDA the caching allocator's ``max_memory_allocated`` is reported too, as the number an OOM
is decided on. (environment.md §7: on CPU the tracker agrees with /proc high-water marks within 5%.)
"""
from __future__ import annotations

import gc
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

GiB = 1024 ** 3

# MemTracker's categories, renamed to the paper's Table 8-11 vocabulary
CATEGORIES = {"Parameter": "weights", "Buffer": "buffers", "Gradient": "gradients", "Optstate": "optimizer_state",
              "Activation": "activations", "Temp": "transient", "Other": "other"}


@dataclass
class MemoryReport:
    """Peak bytes of one measured call and where they went at the peak."""

    peak_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"
    allocator_peak_bytes: int | None = None  # CUDA max_memory_allocated (None on CPU)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GiB

    def to_dict(self) -> dict:
        return {**asdict(self), "peak_gib": self.peak_gib}


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_peak(fn: Callable[[], object], track: Iterable[nn.Module | torch.optim.Optimizer] = (),
                 device: str | torch.device = "cpu") -> MemoryReport:
    """Run ``fn()`` once and return its peak memory on ``device`` (tensors alive before the call count too).

    ``track``: the modules and optimizers whose parameters, gradients and states should be attributed by name
    (everything else allocated during ``fn`` is activations / transient).
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    device = torch.device(device)
    _free()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    tracker = MemTracker()
    tracker.track_external(*track)
    with tracker:
        fn()
    snapshot = tracker.get_tracker_snapshot("peak")
    stats = next((v for k, v in snapshot.items() if torch.device(k).type == device.type), {})
    breakdown = {CATEGORIES.get(k, k): int(v) for k, v in stats.items() if k in CATEGORIES}
    report = MemoryReport(peak_bytes=int(stats.get("Total", sum(breakdown.values()))), breakdown=breakdown,
                          device=str(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        report.allocator_peak_bytes = int(torch.cuda.max_memory_allocated(device))
    return report
