"""mst.memory.timeline.record_timeline on CPU: its peak is MemTracker's, and it sees the phases of a step."""
import torch

from mst.memory.measure import measure_peak
from mst.memory.strategies import make_train_step, prepare
from mst.memory.timeline import record_timeline
from tests.utils import tiny_model


def test_cpu_timeline_peak_equals_memtracker_peak():
    model = prepare(tiny_model("llama"), "mst")
    step, track = make_train_step(model, optimizer="adamw", batch_size=2)
    step(128)  # optimizer state exists from here on
    report = measure_peak(lambda: step(128), track)
    events = record_timeline(lambda: step(128), track)
    assert max(b for _, b in events) == report.peak_bytes
    phases = [event.split(":")[0] for event, _ in events]
    assert phases[0] == "forward" and "backward" in phases and phases[-1] == "after_backward"
    held = sum(p.numel() * 4 for p in model.parameters()) * 3  # weights + AdamW's two states (fp32)
    assert events[-1][1] >= held  # the level never drops below what exists before the call


def test_cpu_timeline_reads_real_values():
    """Unlike the planner's fake-tensor counter, data-dependent reads return the real answer."""
    seen = []
    record_timeline(lambda: seen.append(bool(torch.zeros(3).any())))
    assert seen == [False]
