"""What the planner needs to know about a model and a training step, read from an HF config.

``ModelSpec`` is the handful of shapes every memory term is a function of (d, I, L, heads, KV heads, head_dim, V,
tied embeddings) and the family's facts, read from its row of ``mst.integrations.FAMILIES`` (the table
``mst.apply`` uses: norms per layer and their kind, q/k norms, biases, fused projections, block layout, embedding
scale), plus exact parameter counts. ``Workload`` is one training step:
sequence length, batch, Ulysses sequence-parallel size, dtype, strategy, optimizer, gradient accumulation, and the
device whose allocator conventions apply. ``Budget`` is the card: its memory and the reserve kept free. All three
are plain frozen dataclasses so plans can be cached and compared, and each validates its numbers on construction:
every planner entry point (``plan``, ``max_seq_len``, ``Plan.fits``, the CLI) builds them, so nonsense (NaN, a
negative layer count, a reserve larger than the card) is a ``ValueError`` instead of a confident wrong plan.
"""
from __future__ import annotations

import dataclasses

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from transformers import PretrainedConfig

from ...integrations.families import FAMILIES, Family, text_config
from ...ops import lm_head_chunk_tokens
from ..quantization import QUANTIZATIONS
from ..strategies import OPTIMIZERS, STRATEGIES

FP32 = 4  # bytes: RMSNorm statistics, loss logits and the chunked LM head's gradient accumulator are fp32
INT64 = 8
GiB = 1024 ** 3
MODEL_STATES = ("device", "host")


@dataclass(frozen=True)
class ZeroOffload:
    """DeepSpeed ZeRO-3 with ``offload_param`` and ``offload_optimizer`` to the CPU (DeepSpeedCPUAdam), the engine
    behind ``model_state="host"``. Defaults are DeepSpeed's own (``deepspeed/runtime/zero/config.py``), the ones
    ALST's 500K recipe runs with (it sets none of them).

    Device side: parameters of at most ``param_persistence_threshold`` elements (norm weights) stay resident; the
    others are bf16 partitions on the host, gathered module by module. Counted as gathered at a layer phase: the
    whole layer (DeepSpeed keeps a module's parameters while they are reused within ``max_reuse_distance``, 1e9
    elements: a checkpointed layer's recompute and backward reuse them) plus the prefetch bucket; at the head /
    embedding: that matrix plus the prefetch bucket. Gradients go through one reduce bucket of
    ``reduce_bucket_size`` elements, allocated on the device at engine start (``stage3.py``), then to the host.
    Host side, per parameter: bf16 partition 2 + fp32 master 4 + fp32 gradient partition 4 + Adam exp_avg and
    exp_avg_sq 8 = 18 bytes (DeepSpeed's ``estimate_zero3_model_states_mem_needs`` uses the same 18, times a 1.5
    buffer factor for pinned-memory slack, which is not counted here).
    """

    reduce_bucket_size: int = 500_000_000
    prefetch_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000
    host_bytes_per_param: int = 18
# ModelSpec field -> the HF config key it is read from (error messages name the key a user can fix)
CONFIG_SIZES = {"hidden": "hidden_size", "intermediate": "intermediate_size", "layers": "num_hidden_layers",
                "heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "head_dim": "head_dim",
                "vocab": "vocab_size"}


def check_positive_int(name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` is a positive integer; bools, floats (even 4096.0) and strings are refused,
    since every size and count the planner multiplies by must be a whole number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _is_finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_config_sizes(values: Mapping[str, Any]) -> None:
    """ModelSpec's shape rules on raw HF config values (``CONFIG_SIZES`` keys and ``final_logit_softcapping``;
    absent or None keys are skipped, HF fills them in). Also run on a config.json before transformers builds it,
    because transformers' own checks divide by the head count (ZeroDivisionError for 0 heads)."""
    for key in CONFIG_SIZES.values():
        if values.get(key) is not None:
            check_positive_int(key, values[key])
    heads, kv_heads = values.get("num_attention_heads"), values.get("num_key_value_heads")
    if heads is not None and kv_heads is not None and heads % kv_heads:
        raise ValueError(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads}): "
                         "each KV head serves a whole group of query heads")
    cap = values.get("final_logit_softcapping")
    if cap is not None and not (_is_finite(cap) and cap > 0):
        raise ValueError(f"final_logit_softcapping must be a positive finite number or None, got {cap!r}")


def family_row(config: PretrainedConfig) -> Family:
    """``config``'s row of ``mst.integrations.FAMILIES``; ValueError naming the family otherwise (a family outside
    the table has no known layer layout, and a multimodal wrapper is planned through its text config)."""
    model_type = getattr(config, "model_type", "?")
    row = FAMILIES.get(model_type)
    if row is not None:
        return row
    text = text_config(config)
    if text is not config and getattr(text, "model_type", None) in FAMILIES:
        raise ValueError(f"the memory planner models text decoders: model_type {model_type!r} is a multimodal "
                         f"wrapper; plan its text config ({text.model_type!r}, config.get_text_config()), knowing "
                         "that the vision tower's weights and activations are not counted")
    raise ValueError(f"the memory planner models {', '.join(FAMILIES)} (mst.integrations.FAMILIES); got model_type "
                     f"{model_type!r}, whose decoder layer it does not know (mst.apply may still accept it through "
                     "its generic gated-MLP path)")


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of an HF decoder-only causal LM and its family's facts (the planner's view of a config)."""

    model_type: str
    hidden: int  # d
    intermediate: int  # I
    layers: int  # L
    heads: int  # H (query heads)
    kv_heads: int  # H_kv
    head_dim: int
    vocab: int  # V
    tied: bool  # lm_head shares the embedding matrix
    attn_bias: bool  # bias on q/k/v (Qwen2, or config.attention_bias)
    out_bias: bool  # bias on o_proj (config.attention_bias)
    mlp_bias: bool
    final_softcap: float | None  # Gemma-2/3 final-logit softcapping (vanilla HF builds 3 extra S x V tensors)
    # the family's row (``mst.integrations.families.Family`` says what each fact means for memory), with a q/k norm
    # that a config flag switches (Cohere's use_qk_norm) resolved to a bool
    family: Family = Family()
    rope_dim: int | None = None  # rotated dims per head (Phi-3's partial_rotary_factor; None: head_dim)
    rope_sets: int = 1  # rotary tables the decoder builds (Gemma-3: one per layer type, local and global)

    def __post_init__(self) -> None:
        for name, key in CONFIG_SIZES.items():  # unlike a raw config, a spec has no None left to default
            check_positive_int(key, getattr(self, name))
        check_config_sizes({key: getattr(self, name) for name, key in CONFIG_SIZES.items()}
                           | {"final_logit_softcapping": self.final_softcap})  # head grouping, softcap
        if self.rope_dim is not None:
            check_positive_int("rope dims (head_dim x partial_rotary_factor)", self.rope_dim)

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> "ModelSpec":
        """The spec of an HF config: shapes from the config, facts from its family row (``family_row``);
        ValueError for families outside the table and for sizes that are not positive integers.

        Missing ``head_dim`` / ``num_key_value_heads`` (None) follow HF's defaults (d / heads, heads); explicit
        zeros are errors, not defaults.
        """
        row = family_row(config)
        hidden, heads = config.hidden_size, config.num_attention_heads
        check_positive_int("hidden_size", hidden)  # both are needed to derive head_dim below
        check_positive_int("num_attention_heads", heads)
        head_dim = getattr(config, "head_dim", None)
        head_dim = hidden // heads if head_dim is None else head_dim
        kv_heads = getattr(config, "num_key_value_heads", None)
        attention_bias = bool(getattr(config, "attention_bias", False))
        qk_norm = row.qk_norm if isinstance(row.qk_norm, bool) else bool(getattr(config, row.qk_norm, False))
        rope = getattr(config, "rope_parameters", None) or {}
        if rope and all(isinstance(v, dict) for v in rope.values()):  # per layer type (Gemma-3)
            rope = next(iter(rope.values()))
        factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
        rope_dim = None if factor in (None, 1, 1.0) or not isinstance(head_dim, int) else int(head_dim * factor)
        # one rotary table per layer type when the rope parameters are given per type (Gemma-3: local, global)
        layer_types = set(getattr(config, "layer_types", None) or ())
        per_type = bool(layer_types) and isinstance(getattr(config, "rope_parameters", None), dict) and \
            layer_types <= set(config.rope_parameters)
        return cls(model_type=config.model_type, hidden=hidden, intermediate=config.intermediate_size,
                   layers=config.num_hidden_layers, heads=heads, kv_heads=heads if kv_heads is None else kv_heads,
                   head_dim=head_dim, vocab=config.vocab_size,
                   tied=bool(getattr(config, "tie_word_embeddings", row.tied_embeddings)),
                   attn_bias=attention_bias or row.qkv_bias, out_bias=attention_bias,
                   mlp_bias=bool(getattr(config, "mlp_bias", False)),
                   final_softcap=getattr(config, row.softcap_attr, None) if row.softcap_attr else None,
                   family=dataclasses.replace(row, qk_norm=qk_norm, qk_norm_interleaved=qk_norm and row.qk_norm_interleaved),
                   rope_dim=rope_dim,
                   rope_sets=len(layer_types) if per_type else 1)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def rotary_dim(self) -> int:
        """Dims per head that RoPE rotates (its cos / sin width)."""
        return self.head_dim if self.rope_dim is None else self.rope_dim

    def layer_param_shapes(self) -> list[int]:
        """Element counts of one decoder layer's parameter tensors."""
        d, inter = self.hidden, self.intermediate
        qkv = [self.q_dim + 2 * self.kv_dim] if self.family.fused_qkv else [self.q_dim, self.kv_dim, self.kv_dim]
        mlp_out = [2 * inter] if self.family.fused_gate_up else [inter, inter]
        flat = [d * n for n in qkv] + [self.q_dim * d] + [d * n for n in mlp_out] + [inter * d]
        if self.attn_bias:
            flat += qkv
        if self.out_bias:
            flat.append(d)
        if self.mlp_bias:
            flat += mlp_out + [d]
        if self.family.qk_norm:  # Cohere's LayerNorm has a weight per head; RMSNorms share one over heads
            flat += [self.q_dim, self.kv_dim] if self.family.norm == "layer" else [self.head_dim, self.head_dim]
        return flat + [d] * self.family.norms_per_layer

    def layer_linears(self) -> list[tuple[int, int]]:
        """(in, out) features of one layer's projections: q, k, v (or fused qkv), o, gate, up (or fused gate_up),
        down."""
        d, inter = self.hidden, self.intermediate
        attn = [(d, self.q_dim + 2 * self.kv_dim)] if self.family.fused_qkv else [(d, self.q_dim), (d, self.kv_dim),
                                                                          (d, self.kv_dim)]
        mlp = [(d, 2 * inter)] if self.family.fused_gate_up else [(d, inter), (d, inter)]
        return attn + [(self.q_dim, d)] + mlp + [(inter, d)]

    def lora_layer_params(self, rank: int) -> int:
        """LoRA adapter elements of one layer (A: rank x in, B: out x rank on every projection)."""
        return sum(rank * (fan_in + fan_out) for fan_in, fan_out in self.layer_linears())

    @property
    def layer_params(self) -> int:
        return sum(self.layer_param_shapes())

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """Final norm + lm_head (0 extra for the head matrix when tied to the embedding)."""
        return self.hidden + (0 if self.tied else self.vocab * self.hidden)

    @property
    def params(self) -> int:
        return self.embed_params + self.layers * self.layer_params + self.head_params

    @property
    def largest_param(self) -> int:
        return max(self.embed_params, max(self.layer_param_shapes()))

    @property
    def buffer_bytes(self) -> int:
        """Rotary ``inv_freq`` and ``original_inv_freq`` (fp32, rotated dims / 2 each), per rotary table."""
        return self.rope_sets * 2 * FP32 * (self.rotary_dim // 2)


@dataclass(frozen=True)
class Workload:
    """One training step to plan (see ``mst.memory.plan``)."""

    seq_len: int
    strategy: str = "mst"
    batch_size: int = 1
    sp_size: int = 1  # Ulysses sequence-parallel size (ranks, one GPU each)
    dtype: torch.dtype = torch.bfloat16
    optimizer: str = "adamw"
    grad_accumulation: bool = False  # a flag, not a count: the step is a micro-step of an accumulation window
    device: str = "cuda"  # "cpu" counts offloaded checkpoints as resident and uses CPU AdamW's for-loop
    mst_options: tuple = ()  # extra ``mst.apply`` options as (name, value) pairs (traced engine only)
    quantization: str | None = None  # "int8" | "nf4": frozen k-bit projections + LoRA (mst.memory.quantization)
    lora_rank: int = 16
    model_state: str = "device"  # "host": weights, gradients and Adam on the CPU through ZeRO-3 (``ZeroOffload``)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose from {', '.join(STRATEGIES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        for name, label in (("seq_len", "seq_len"), ("batch_size", "batch_size"), ("sp_size", "sp_size"),
                            ("lora_rank", "lora_rank")):
            check_positive_int(label, getattr(self, name))
        if self.seq_len % self.sp_size:
            raise ValueError(f"seq_len {self.seq_len} is not divisible by the sequence-parallel size {self.sp_size}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {self.quantization!r}; choose from {', '.join(QUANTIZATIONS)}")
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype}")
        if not isinstance(self.grad_accumulation, bool):  # a count here (1 = "no accumulation") would read as True
            raise ValueError(f"grad_accumulation is a flag (True: plan a micro-step of an accumulation window, "
                             f"gradients resident; the planner takes no step count), got {self.grad_accumulation!r}")
        if self.model_state not in MODEL_STATES:
            raise ValueError(f"model_state must be one of {MODEL_STATES}, got {self.model_state!r}")
        if self.model_state == "host":
            if self.device != "cuda":
                raise ValueError("model_state='host' plans a GPU with its host: on device='cpu' both are one memory")
            if self.optimizer != "adamw":
                raise ValueError("model_state='host' steps AdamW on the host after backward (DeepSpeedCPUAdam): "
                                 f"use optimizer='adamw', not {self.optimizer!r}")
            if self.quantization is not None:
                raise ValueError("model_state='host' with quantized weights is not modelled")

    @property
    def local_seq(self) -> int:
        """Tokens of the sequence one rank holds (MLP, norms, LM head and checkpoints run on this shard)."""
        return self.seq_len // self.sp_size

    @property
    def tokens(self) -> int:
        """T: tokens per rank (batch x local sequence)."""
        return self.batch_size * self.local_seq

    @property
    def act_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def host_state(self) -> bool:
        """Model state on the host (ZeRO-3 offload): the device holds only gathered parameters and buckets."""
        return self.model_state == "host"

    @property
    def checkpointed(self) -> bool:
        return self.strategy != "vanilla"

    @property
    def frozen(self) -> bool:
        """Quantized training: the base weights get no gradients (only the LoRA adapters train)."""
        return self.quantization is not None

    @property
    def chunked(self) -> bool:
        return self.strategy in ("mst", "mst_offload")

    @property
    def offload(self) -> bool:
        return self.strategy == "mst_offload"

    def check_heads(self, spec: ModelSpec) -> None:
        """Ulysses splits heads across ranks: both head counts must divide by the SP size."""
        if spec.heads % self.sp_size or spec.kv_heads % self.sp_size:
            raise ValueError(f"sequence-parallel size {self.sp_size} must divide the attention heads ({spec.heads}) "
                             f"and the KV heads ({spec.kv_heads})")


@dataclass(frozen=True)
class Budget:
    """The card a plan is for: ``gpu_mem_gb`` GiB, of which ``reserve_gb`` stay free (CUDA context, cuBLAS
    workspaces, fragmentation). Validated here, so NaN or a negative reserve cannot make a budget larger than the
    card or a search that silently stops at its first step."""

    gpu_mem_gb: float = 80.0
    reserve_gb: float = 0.0

    def __post_init__(self) -> None:
        if not (_is_finite(self.gpu_mem_gb) and self.gpu_mem_gb > 0):
            raise ValueError(f"gpu_mem_gb must be a positive finite number, got {self.gpu_mem_gb!r}")
        if not (_is_finite(self.reserve_gb) and 0 <= self.reserve_gb < self.gpu_mem_gb):
            raise ValueError(f"reserve_gb must be a finite number from 0 to less than gpu_mem_gb "
                             f"({self.gpu_mem_gb:g}), got {self.reserve_gb!r}")

    @property
    def usable_bytes(self) -> float:
        """What a step's planned peak may reach."""
        return (self.gpu_mem_gb - self.reserve_gb) * GiB


def lm_head_chunk(spec: ModelSpec, tokens: int) -> int:
    """Tokens per chunk of MsT's LM head (``mst.ops.lm_head_chunk_tokens``' default)."""
    return lm_head_chunk_tokens(tokens, spec.vocab, spec.hidden)
