"""Live-bytes counter: a dispatch mode that counts the storage bytes ops create, until each storage dies.

It reports the quantity ``torch.distributed._tools.mem_tracker.MemTracker`` reports, with the peak between marks,
and works on fake tensors (nothing allocated) as well as real ones. Its two users: the planner's traced engine
(``mst.memory.planner.traced``, fake tensors) and the CPU memory timeline (``mst.memory.timeline``, real tensors).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary


@dataclass
class Mark:
    """Live bytes at a mark (and which storages), and the peak (with its storages) since the previous mark."""

    current: int
    peak: int
    alive: frozenset = field(default_factory=frozenset)
    peak_storages: frozenset = field(default_factory=frozenset)


# Fake tensors carry no values, so reading one (``bool(t)``) is answered here: the chunked LM head skips a chunk
# only if all its labels are ignored (``all()``) / keeps it if any is valid (``any()``); memory-wise the worst case
# is that every chunk has valid labels, i.e. all() -> False and any() -> True.
_FAKE_TRUTH = {torch.ops.aten.all.default: False, torch.ops.aten.all.dim: False,
               torch.ops.aten.any.default: True, torch.ops.aten.any.dim: True}


class LiveBytes(TorchDispatchMode):
    """Counts the storage bytes created by ops inside the mode that are still alive; ``mark()`` splits windows.

    ``ignore``: tensors that exist before the trace (parameters, inputs): ops that return views of them must not
    count them as new memory. Also answers ``item()`` of fake ``all()``/``any()`` results (see ``_FAKE_TRUTH``);
    any other data-dependent read raises, as plain fake tensors do.
    """

    def __init__(self, ignore=()):
        super().__init__()
        self._truth = WeakIdKeyDictionary()  # storage of an all()/any() result -> the value to read
        self._ids = WeakIdKeyDictionary()  # storage -> serial number
        self._size: dict[int, int] = {-1: 0}  # serial -> bytes (kept after death, for attribution)
        self._label: dict[int, tuple[str, str, tuple[int, ...]]] = {}  # serial -> (op, dtype, shape) that made it
        for t in ignore:
            self._ids[t.untyped_storage()] = -1
        self._alive: set[int] = set()
        self.current = 0
        self._peak = 0
        self._peak_alive: frozenset = frozenset()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].untyped_storage() in self._truth:
            return self._truth[args[0].untyped_storage()]
        out = func(*args, **(kwargs or {}))
        if func in _FAKE_TRUTH:
            self._truth[out.untyped_storage()] = _FAKE_TRUTH[func]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, func)
        if self.current > self._peak:
            self._peak, self._peak_alive = self.current, frozenset(self._alive)
        return out

    def _track(self, tensor: torch.Tensor, func) -> None:
        storage = tensor.untyped_storage()
        if storage in self._ids:
            return
        serial = len(self._size) - 1
        self._ids[storage] = serial
        self._size[serial] = storage.nbytes()
        self._label[serial] = (func.overloadpacket.__name__, str(tensor.dtype).removeprefix("torch."),
                               tuple(tensor.shape))
        self._alive.add(serial)
        self.current += self._size[serial]
        weakref.finalize(storage, self._drop, serial)

    def _drop(self, serial: int) -> None:
        self._alive.discard(serial)
        self.current -= self._size[serial]

    def forget(self, storages: frozenset) -> int:
        """Stop counting these (alive) storages from now on; returns their bytes."""
        freed = sum(self._size[s] for s in storages & self._alive)
        for serial in storages:
            self._alive.discard(serial)
            self._size[serial] = 0
        self.current -= freed
        return freed

    def mark(self) -> Mark:
        """Close the window (its peak and the storages alive then), and start a new one at the current level."""
        alive = frozenset(self._alive)
        if self.current >= self._peak:
            self._peak, self._peak_alive = self.current, alive
        mark = Mark(self.current, self._peak, alive, self._peak_alive)
        self._peak, self._peak_alive = self.current, alive
        return mark

    def serials_of(self, tensors) -> frozenset:
        """Serial numbers of the given tensors' storages (None for untracked ones)."""
        return frozenset(self._ids.get(t.untyped_storage()) for t in tensors if t is not None)

    def by_tensor(self, storages: frozenset) -> list[tuple[tuple[str, str, tuple[int, ...]], int]]:
        """The given storages grouped by (op that made them, dtype, shape), with their bytes, largest first: what
        a peak is made of (``python -m mst plan --explain``)."""
        groups: dict[tuple[str, str, tuple[int, ...]], int] = {}
        for serial in storages:
            if serial in self._label and self._size[serial]:
                groups[self._label[serial]] = groups.get(self._label[serial], 0) + self._size[serial]
        return sorted(groups.items(), key=lambda item: -item[1])

    def bytes_of(self, storages: frozenset, tensors) -> int:
        """Bytes of the given tensors' storages that were among ``storages`` (e.g. gradients alive at a peak)."""
        return sum(self._size[s] for s in self.serials_of(tensors) & storages)
