"""Memory engine: optimizer-in-backward, measurement and the planner.

    from mst.memory import plan, max_seq_len, measure_peak, optimizer_in_backward
    plan(load_config("llama3-8b"), 60_000, "mst").peak_bytes      # predicted peak of one training step
    max_seq_len(load_config("llama3-8b"), "mst", gpu_mem_gb=80)    # longest sequence that fits
"""
from .backward_optimizer import OptimizerInBackward, optimizer_in_backward
from .measure import MemoryReport, measure_peak
from .planner import Plan, max_seq_len, plan

__all__ = ["MemoryReport", "OptimizerInBackward", "Plan", "max_seq_len", "measure_peak", "optimizer_in_backward",
           "plan"]
