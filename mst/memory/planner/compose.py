"""Compose per-component memory profiles into the peak of a whole training step (the paper's Theorems 1-3).

Both engines describe a step by the same few numbers, measured (traced engine) or computed (analytic engine) for
the local shard of ``T = batch x seq_len / sp`` tokens:

- ``LayerProfile``: what one decoder layer keeps from forward to backward (``saved``: every activation autograd
  saves for vanilla; only the layer input for the checkpointed strategies) and the live bytes at the peak of its
  forward and of its backward (for ``ac``/``mst`` the backward includes the recomputed forward);
- ``HeadProfile``: the same for the final norm + LM head + loss, plus the tensors every layer shares (position ids,
  rotary cos/sin) and the embedding's backward.

The step is: forward with labels, ``loss.backward()``, ``AdamW.step()``, ``zero_grad(set_to_none=True)``, with the
model output (and so any logits) released before backward, as HF's Trainer and ``model(...).loss.backward()`` do.
Memory is then a sum of persistent terms (weights W, Adam state 2W, gradients), the stack of per-layer ``saved``
(L of them during the forward, fewer as backward proceeds, while gradients grow) and one component's transient.
Because those two stacks change linearly with the layer index, the largest layer-backward candidate is at the top
or the bottom layer, so the peak is the maximum over a handful of phases:

    forward of the last layer / of the head, backward of the head / of layer L / of layer 1 / of the embedding,
    and the optimizer step (AdamW for-loop: two parameter-sized temporaries, ``denom = sqrt(v) / c + eps``).

Theorem 1 (vanilla) is L x saved + head; Theorem 2 (checkpointing) has saved = one hidden state and moves the
transient into the recomputed layer; Theorem 3 (MsT) shrinks the MLP and LM-head transients by the chunking.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..quantization import quantized_weight_bytes
from .spec import FP32, Budget, GiB, ModelSpec, Workload, ZeroOffload


@dataclass(frozen=True)
class LayerProfile:
    """One decoder layer (bytes). Peaks are absolute live bytes inside the layer's window (see module doc)."""

    saved: int  # kept from forward to backward (with checkpointing: the layer input)
    fwd_peak: int  # during forward, including the layer input
    bwd_peak: int  # during backward: its saved + incoming gradient + transients + gradients made so far
    bwd_peak_grads: int  # parameter gradients alive at that backward peak
    offloadable: int = 0  # bytes of ``saved`` that mst_offload keeps on the host instead
    # what ``bwd_peak`` is made of (traced engine): ((op, dtype, shape), bytes), largest first
    bwd_peak_tensors: tuple = ()


@dataclass(frozen=True)
class HeadProfile:
    """Embedding, shared tensors, final norm + LM head + loss (bytes, absolute within their windows)."""

    shared: int  # alive from the embedding to the end of layer 1's backward (position ids, rotary cos/sin)
    fwd_peak: int  # during the head forward, including its input (the last hidden state)
    saved: int  # kept by the head after forward (output released)
    bwd_peak: int  # during the head backward
    bwd_peak_grads: int
    bwd_end: int  # alive when the gradient reaches the last hidden state (head gradients + that gradient)
    bwd_end_grads: int
    embed_bwd_peak: int  # during the embedding backward (on top of the layers' gradients)
    embed_bwd_peak_grads: int


@dataclass
class Plan:
    """Predicted peak of one training step, where it happens, and what it is made of."""

    peak_bytes: int
    breakdown: dict[str, int]  # weights, gradients, optimizer_state, activations, transient
    phase: str  # the step phase that sets the peak
    phases: dict[str, int] = field(default_factory=dict)  # every candidate phase's total
    host_bytes: int = 0  # this rank's bytes in CPU memory: checkpoints (mst_offload), model state (model_state="host")
    model_state: str = "device"
    # at a layer-backward peak (traced engine): the layer's tensors alive then, {"op", "dtype", "shape", "bytes"}
    peak_tensors: list[dict] = field(default_factory=list)
    seq_len: int = 0
    strategy: str = ""
    engine: str = ""
    model_type: str = ""
    sp_size: int = 1
    batch_size: int = 1
    dtype: str = ""
    optimizer: str = ""
    grad_accumulation: bool = False  # flag: planned as a micro-step of an accumulation window
    device: str = "cuda"
    gpu_mem_gb: float = 80.0

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GiB

    def fits(self, gpu_mem_gb: float | None = None, reserve_gb: float = 0.0) -> bool:
        """True when the peak fits ``gpu_mem_gb`` (None: the planned one) GiB minus ``reserve_gb``; ValueError for
        a card that is not one (``Budget``)."""
        budget = Budget(self.gpu_mem_gb if gpu_mem_gb is None else gpu_mem_gb, reserve_gb)
        return self.peak_bytes <= budget.usable_bytes

    def to_dict(self) -> dict:
        return {**asdict(self), "peak_gib": self.peak_gib}


def adam_step_temporaries(device: str, per_parameter: bool) -> int:
    """Parameter-sized temporaries of one AdamW update: the for-loop makes sqrt(v) and sqrt(v)/c (2); a
    per-parameter optimizer (optimizer-in-backward) defaults to foreach on CUDA, which makes only sqrt(v) (1)."""
    return 1 if per_parameter and device == "cuda" else 2


def host_state_bytes(spec: ModelSpec, wl: Workload, zero: ZeroOffload = ZeroOffload()) -> dict[str, int]:
    """Device bytes of the model state under ZeRO-3 offload at each kind of phase ("layer", "head", "embedding"),
    and its host bytes on this rank ("host"; ZeRO partitions over all ``sp_size`` ranks). See ``ZeroOffload``."""
    act, small = wl.act_bytes, zero.param_persistence_threshold
    shapes = spec.layer_param_shapes()
    resident = (spec.layers * sum(n for n in shapes if n <= small) + spec.hidden) * act + spec.buffer_bytes
    resident += zero.reduce_bucket_size * act  # the gradient bucket, allocated at engine start
    prefetch = zero.prefetch_bucket_size * act
    layer = sum(n for n in shapes if n > small) * act
    embed = spec.embed_params * act
    head = embed if spec.tied else (spec.head_params - spec.hidden) * act
    return {"layer": resident + layer + prefetch, "head": resident + head + prefetch,
            "embedding": resident + embed + prefetch,
            "host": zero.host_bytes_per_param * spec.params // wl.sp_size}


def compose(spec: ModelSpec, wl: Workload, layer: LayerProfile, head: HeadProfile, engine: str) -> Plan:
    """Peak and breakdown of one training step from the component profiles (see the module docstring). With
    ``model_state="host"`` the persistent terms are ZeRO-3 offload's (``host_state_bytes``): the weights a phase
    has gathered, no optimizer state, and no gradient outlives its layer's backward on the device."""
    act, n_layers = wl.act_bytes, spec.layers
    if wl.frozen:  # k-bit frozen projections, everything else frozen in the model dtype, LoRA adapters trained
        linears = spec.layer_linears()
        trainable = n_layers * spec.lora_layer_params(wl.lora_rank)
        frozen = spec.params - n_layers * sum(fan_in * fan_out for fan_in, fan_out in linears)
        quantized = sum(quantized_weight_bytes(fan_in * fan_out, fan_out, wl.quantization) for fan_in, fan_out in linears)
        weights = (frozen + trainable) * act + n_layers * quantized + spec.buffer_bytes
        n_tensors, largest = n_layers * 2 * len(linears), wl.lora_rank * max(max(shape) for shape in linears)
        layer_grads = spec.lora_layer_params(wl.lora_rank) * act
    else:
        trainable, largest = spec.params, spec.largest_param
        weights = spec.params * act + spec.buffer_bytes
        n_tensors = n_layers * len(spec.layer_param_shapes()) + 2 + (0 if spec.tied else 1)
        layer_grads = spec.layer_params * act
    # AdamW keeps exp_avg and exp_avg_sq in the parameter dtype; its `step` counters are device tensors on CPU only
    opt_state = 2 * trainable * act + (FP32 * n_tensors if wl.device == "cpu" else 0)
    grads_all = trainable * act
    in_backward = wl.optimizer == "adamw_in_backward"
    resident = grads_all if wl.grad_accumulation and not wl.host_state else 0  # gradients alive all micro-step
    hidden = wl.tokens * spec.hidden * act  # one hidden state (the incoming gradient of a layer has this size)
    host = layer.offloadable if wl.offload else 0
    zero = host_state_bytes(spec, wl) if wl.host_state else None
    stacked = layer.saved - (host if wl.device == "cuda" else 0)  # device bytes one layer keeps till backward

    def grads(made_before: int) -> int:
        """Gradient bytes alive before a backward phase. With optimizer-in-backward the profiles already free
        each gradient after its update; with accumulation every gradient is resident all along."""
        if wl.grad_accumulation:
            return resident
        return 0 if in_backward or wl.host_state else made_before

    head_left = head.bwd_end - head.bwd_end_grads - hidden  # what the head leaves besides its grads and dh
    phases: dict[str, tuple[int, int, int, int, int]] = {}  # name -> (total, weights, opt, gradients, activations)

    def add(name: str, running: str | None, grads_alive: int, stack: int, peak: int, peak_grads: int = 0,
            own_saved: int = 0):
        """One candidate: persistent terms + stacked activations + one component's peak (+ its own saved). The
        persistent terms are all weights and optimizer state, or with the model state on the host what the
        ``running`` module ("layer", "head", "embedding") has gathered (``host_state_bytes``)."""
        w, o = (weights, opt_state) if zero is None else (zero[running], 0)
        phases[name] = (w + o + grads_alive + stack + peak, w, o, grads_alive + peak_grads, stack + own_saved)

    add("forward: last layer", "layer", resident, head.shared + (n_layers - 1) * stacked, layer.fwd_peak)
    add("forward: LM head + loss", "head", resident, head.shared + n_layers * stacked, head.fwd_peak)
    add("backward: LM head + loss", "head", grads(0), head.shared + n_layers * stacked, head.bwd_peak,
        head.bwd_peak_grads, own_saved=head.saved)
    for index, label in ((n_layers, "backward: top layer"), (1, "backward: bottom layer")):
        made = head.bwd_end_grads + (n_layers - index) * layer_grads
        add(label, "layer", grads(made), head.shared + (index - 1) * stacked + head_left, layer.bwd_peak,
            layer.bwd_peak_grads, own_saved=stacked)
    # accumulating with optimizer-in-backward: the last micro-step also runs each update's temporaries
    last_update = adam_step_temporaries(wl.device, True) * largest * act if in_backward else 0
    add("backward: embedding", "embedding", grads(n_layers * layer_grads), 0,
        head.embed_bwd_peak + last_update * (resident > 0), head.embed_bwd_peak_grads)
    if wl.optimizer == "adamw" and zero is None:  # with the model state on the host, so is the step
        add("optimizer step", None, grads_all, 0, adam_step_temporaries(wl.device, False) * largest * act)

    name = max(phases, key=lambda k: phases[k][0])
    total, weights_now, opt_now, grads_at_peak, activations = phases[name]
    breakdown = {"weights": weights_now, "gradients": grads_at_peak, "optimizer_state": opt_now,
                 "activations": activations,
                 "transient": total - weights_now - opt_now - grads_at_peak - activations}
    tensors = [{"op": op, "dtype": dtype, "shape": list(shape), "bytes": size}
               for (op, dtype, shape), size in layer.bwd_peak_tensors] if name.endswith("layer") else []
    return Plan(peak_bytes=total, breakdown=breakdown, phase=name, phases={k: v[0] for k, v in phases.items()},
                host_bytes=n_layers * host + (zero["host"] if zero else 0), model_state=wl.model_state,
                peak_tensors=tensors, seq_len=wl.seq_len, strategy=wl.strategy,
                engine=engine, model_type=spec.model_type, sp_size=wl.sp_size, batch_size=wl.batch_size,
                dtype=str(wl.dtype).split(".")[-1], optimizer=wl.optimizer, grad_accumulation=wl.grad_accumulation,
                device=wl.device)


__all__ = ["GiB", "HeadProfile", "LayerProfile", "Plan", "adam_step_temporaries", "compose", "host_state_bytes"]
