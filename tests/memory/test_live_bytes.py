"""``LiveBytes`` (mst.memory.live_bytes), the counter under the traced planner and the CPU timeline: a storage counts
from the op that creates it until it dies, views of pre-existing tensors count nothing, and ``mark`` reports the
peak of the window it closes."""
from __future__ import annotations

import torch

from mst.memory.live_bytes import LiveBytes


def test_counts_created_storages_until_they_die():
    weight = torch.ones(8, 8)
    tracker = LiveBytes([weight])
    with tracker:
        view = weight.t()  # a view of an ignored tensor: no new memory
        assert tracker.current == 0
        a = weight @ weight  # 256 bytes
        b = a * 2  # 256 more
        assert tracker.current == 512
        del a
        assert tracker.current == 256
    first = tracker.mark()
    assert (first.current, first.peak) == (256, 512)
    del b, view
    second = tracker.mark()
    assert (second.current, second.peak) == (0, 256)  # the new window starts at the level of the previous mark


def test_bytes_of_attributes_storages_alive_at_the_peak():
    x = torch.ones(4, requires_grad=True)
    tracker = LiveBytes([x])
    with tracker:
        (x * x).sum().backward()
    mark = tracker.mark()
    assert tracker.bytes_of(mark.peak_storages, [x.grad]) == x.grad.numel() * x.grad.element_size()
