"""What one training step costs besides memory: FLOPs, host <-> device traffic, and a time estimate from both.

The memory plan says whether a length fits; this says what a step at that length costs, so a user can see that a
1M-token step of an 8B model is an attention-bound job of tens of minutes before renting the GPU. Per rank, for
``tokens = batch x seq_len / sp_size``:

- FLOPs of the matmuls, ``2 x tokens x (matmul parameters)`` forward, and of causal attention,
  ``2 x batch x seq_len^2 x q_dim / sp_size`` forward per layer (QK^T and AV over the lower triangle; Ulysses gives
  each rank heads / sp_size over the whole sequence). Backward is twice the forward. ``model_flops`` counts that
  (forward + backward); ``hardware_flops`` adds the recomputation the strategy runs: the checkpointed layer
  forward (every strategy but vanilla), the LM head's logits again in backward (mst), and the attention forward a
  third time (``attention=True``: each query chunk is recomputed for its gradients).
- Traffic over the host link: checkpoints (``mst_offload``) out in forward and back in backward; with
  ``model_state="host"`` (ZeRO-3 offload) this rank's parameter partition comes in twice (the forward, then the
  recompute + backward, which reuse one gathering) and its gradient partition goes out once.
- Time: ``compute_s = hardware_flops / tflops`` at the stated sustained TFLOP/s, ``transfer_s`` = the busier
  direction over ``host_gbps`` GB/s; ``step_s`` = the larger (transfers overlapped with compute, as DeepSpeed and
  the checkpoint offload do). Not modelled: DeepSpeedCPUAdam's host step, communication between GPUs, sliding
  windows (full causal attention is assumed).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import PretrainedConfig

from .spec import ModelSpec, Workload, _is_finite

DEFAULT_TFLOPS = 400.0  # an assumption: bf16 dense, ~40% of an H100 SXM's 989 TFLOP/s peak
DEFAULT_HOST_GBPS = 25.0  # an assumption: one direction of PCIe Gen4 x16 as measured by typical pinned copies


@dataclass(frozen=True)
class StepCost:
    """One rank's FLOPs, host-link bytes and estimated seconds for one training step."""

    model_flops: float
    hardware_flops: float
    host_to_device_bytes: int
    device_to_host_bytes: int
    tflops: float
    host_gbps: float

    @property
    def compute_s(self) -> float:
        return self.hardware_flops / (self.tflops * 1e12)

    @property
    def transfer_s(self) -> float:
        return max(self.host_to_device_bytes, self.device_to_host_bytes) / (self.host_gbps * 1e9)

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.transfer_s)

    def to_dict(self) -> dict:
        return {**asdict(self), "compute_s": self.compute_s, "transfer_s": self.transfer_s, "step_s": self.step_s}


def step_cost(config: PretrainedConfig, seq_len: int, strategy: str = "mst", *, sp_size: int = 1,
              batch_size: int = 1, dtype: torch.dtype = torch.bfloat16, model_state: str = "device",
              attention: bool = False, tflops: float = DEFAULT_TFLOPS,
              host_gbps: float = DEFAULT_HOST_GBPS) -> StepCost:
    """FLOPs, traffic and time of one step of ``config`` at ``seq_len`` tokens (see the module docstring)."""
    for name, value in (("tflops", tflops), ("host_gbps", host_gbps)):
        if not (_is_finite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    spec = ModelSpec.from_config(config)
    wl = Workload(seq_len=seq_len, strategy=strategy, batch_size=batch_size, sp_size=sp_size, dtype=dtype,
                  model_state=model_state)
    layer_matmul = 2 * wl.tokens * sum(fan_in * fan_out for fan_in, fan_out in spec.layer_linears())
    layer_attention = 2 * batch_size * seq_len ** 2 * spec.q_dim / sp_size
    head = 2 * wl.tokens * spec.vocab * spec.hidden
    forward = spec.layers * (layer_matmul + layer_attention) + head
    model_flops = 3 * forward
    extra = (spec.layers * (layer_matmul + layer_attention) if wl.checkpointed else 0) + (head if wl.chunked else 0)
    extra += spec.layers * layer_attention if attention else 0
    checkpoints = spec.layers * wl.tokens * spec.hidden * wl.act_bytes if wl.offload else 0
    partition = spec.params * wl.act_bytes // sp_size if wl.host_state else 0
    return StepCost(model_flops=model_flops, hardware_flops=model_flops + extra,
                    host_to_device_bytes=checkpoints + 2 * partition, device_to_host_bytes=checkpoints + partition,
                    tflops=float(tflops), host_gbps=float(host_gbps))


__all__ = ["DEFAULT_HOST_GBPS", "DEFAULT_TFLOPS", "StepCost", "step_cost"]
