"""Measure the peak memory of a training step, with a breakdown, on CUDA or CPU.

The same function serves both devices so CPU results (tests, the scaled-down experiments) and GPU results are the
same kind of number. The breakdown comes from ``torch.distributed._tools.mem_tracker.MemTracker`` (tensor
storages attributed to parameters, gradients, optimizer state, activations, temporaries), which counts exactly
what tensors hold; on CUDA the caching allocator's ``max_memory_allocated`` is reported too, as the number an OOM
is decided on. (docs/environment.md §7: on CPU the tracker agrees with /proc high-water marks within 5%.)

``method="rss"`` (Linux, CPU) is the cheap alternative for long searches: the tracker intercepts every op, which
slows a 32-layer step several-fold, while the kernel's resettable resident-set high-water mark costs nothing. It
reports the tracked modules'/optimizers' tensor bytes at the start plus the step's growth of the resident set
(no breakdown). Run with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors are returned to the OS at once; smaller
ones stay in glibc's heap, which is trimmed before each measured step.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator

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


def _step_tracker():
    """A MemTracker that accepts several forward passes of the same model in one measured call.

    MemTracker refuses a second forward of a root module ("multiple iterative calls"), which is exactly what a
    gradient-accumulation step does; its module statistics are not used here, so they are reset at each new
    micro-step while the global peak, which is all ``measure_peak`` reads, keeps accumulating. It also accepts
    frozen parameters (quantized training): MemTracker would put a gradient hook on every parameter, which torch
    refuses for one that needs no gradient, so a module holding any is tracked without hooks (its trainable
    submodules, e.g. LoRA adapters, install theirs when they run).
    """
    from torch.distributed._tools.mem_tracker import MemTracker

    class _StepTracker(MemTracker):
        def _pre_fw_hook(self, module: nn.Module, inputs) -> None:
            name = self._mod_tracker.get_known_fqn(module)
            if (module in self.memory_tracking and not self._mod_tracker.is_bw
                    and set(self._mod_tracker.parents) - {name} == {"Global"}):
                self.reset_mod_stats()
            super()._pre_fw_hook(module, inputs)

        def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True):
            frozen = any(not p.requires_grad for p in module.parameters())
            return super()._track_module_params_and_buffers(module, install_grad_hooks and not frozen)

    return _StepTracker()


def free_memory() -> None:
    """Return memory of tensors just dropped: collect cycles, and hand CUDA's cached blocks back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def held_tensors(track: Iterable[nn.Module | torch.optim.Optimizer]) -> Iterator[torch.Tensor]:
    """Parameters, gradients and buffers of the modules in ``track``, and the tensor states of its optimizers."""
    for obj in track:
        if isinstance(obj, nn.Module):
            for p in obj.parameters():
                yield p
                if p.grad is not None:
                    yield p.grad
            yield from obj.buffers()
        else:
            yield from (t for state in obj.state.values() for t in state.values() if torch.is_tensor(t))


def _tracked_bytes(track: Iterable[nn.Module | torch.optim.Optimizer]) -> int:
    """Bytes of the distinct storages held by parameters, gradients and optimizer states of ``track``."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held_tensors(track)}.values())


def _proc_status(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _release_free_heap() -> None:
    """Give glibc's free heap pages back to the OS (``malloc_trim(0)``), so that chunks freed by an earlier, longer
    step (tensors under the mmap threshold) count again when this step reuses them. What is left is page rounding:
    within 0.4% of MemTracker for optimizer-in-backward steps, ~5% over for gradient-accumulation steps (measured,
    experiments/table4/README.md); use method="tracker" where that matters."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def set_mmap_threshold(nbytes: int) -> bool:
    """glibc's mmap threshold, set at run time as ``MALLOC_MMAP_THRESHOLD_`` sets it at start, with the heap trim
    threshold at twice it (glibc's own rule while it adjusts them dynamically, which any setting stops).

    65536 (what method="rss" wants; set it before the process has allocated much) hands every freed tensor back to
    the OS at once, so RSS peaks are exact; but then each larger tensor is a fresh mapping whose pages fault in on
    first touch, which more than doubled a scaled-model CPU training step in experiments/table6. Timed runs use
    32 MiB (glibc's dynamic maximum). False off glibc."""
    libc = _glibc()
    # malloc.h: M_MMAP_THRESHOLD = -3, M_TRIM_THRESHOLD = -1
    return bool(libc is not None and libc.mallopt(-3, int(nbytes)) and libc.mallopt(-1, 2 * int(nbytes)))


@functools.lru_cache(maxsize=1)
def _glibc():
    """glibc, looked up once (``find_library`` runs ``ldconfig``); None where there is none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc: nothing to release, the measurement is as before
        return None


def _measure_rss(fn: Callable[[], object], track) -> MemoryReport:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError as exc:
        raise RuntimeError("method='rss' needs Linux /proc/self/clear_refs; use method='tracker'") from exc
    _release_free_heap()
    static, before = _tracked_bytes(track), _proc_status("VmRSS")
    fn()
    growth = max(0, _proc_status("VmHWM") - before)
    return MemoryReport(peak_bytes=static + growth, breakdown={"static_at_start": static, "step_growth": growth})


def measure_peak(fn: Callable[[], object], track: Iterable[nn.Module | torch.optim.Optimizer] = (),
                 device: str | torch.device = "cpu", method: str = "tracker") -> MemoryReport:
    """Run ``fn()`` once and return its peak memory on ``device`` (tensors alive before the call count too).

    ``track``: the modules and optimizers whose parameters, gradients and states should be attributed by name
    (everything else allocated during ``fn`` is activations / transient).
    ``method``: "tracker" (MemTracker, exact tensor bytes with a breakdown) or "rss" (CPU only, see module doc).
    """
    device = torch.device(device)
    track = list(track)
    free_memory()
    if method == "rss":
        if device.type != "cpu":
            raise ValueError("method='rss' measures host memory; use method='tracker' on CUDA")
        return _measure_rss(fn, track)
    if method != "tracker":
        raise ValueError(f"method must be 'tracker' or 'rss', got {method!r}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    tracker = _step_tracker()
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
