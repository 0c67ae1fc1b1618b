"""What the planner needs to know about a model and a training step, read from an HF config.

``ModelSpec`` is the handful of shapes every memory term is a function of (d, I, L, heads, KV heads, head_dim, V,
tied embeddings, and the Gemma-2 differences), plus exact parameter counts. ``Workload`` is one training step:
sequence length, batch, Ulysses sequence-parallel size, dtype, strategy, optimizer, gradient accumulation, and the
device whose allocator conventions apply. ``Budget`` is the card: its memory and the reserve kept free. All three
are plain frozen dataclasses so plans can be cached and compared, and each validates its numbers on construction:
every planner entry point (``plan``, ``max_seq_len``, ``Plan.fits``, the CLI) builds them, so nonsense (NaN, a
negative layer count, a reserve larger than the card) is a ``ValueError`` instead of a confident wrong plan.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from transformers import PretrainedConfig

from ...ops import lm_head_chunk_tokens
from ..quantization import QUANTIZATIONS
from ..strategies import OPTIMIZERS, STRATEGIES

# model types whose decoder layer the analytic engine models term by term (the traced engine runs the HF code)
FAMILIES = ("llama", "mistral", "qwen2", "gemma2")
FP32 = 4  # bytes: RMSNorm statistics, loss logits and the chunked LM head's gradient accumulator are fp32
INT64 = 8
GiB = 1024 ** 3
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


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of an HF Llama-style causal LM (the planner's view of a config)."""

    model_type: str
    hidden: int  # d
    intermediate: int  # I
    layers: int  # L
    heads: int  # H (query heads)
    kv_heads: int  # H_kv
    head_dim: int
    vocab: int  # V
    tied: bool  # lm_head shares the embedding matrix
    attn_bias: bool  # bias on q/k/v (Qwen2)
    out_bias: bool  # bias on o_proj (Llama with attention_bias=True)
    mlp_bias: bool
    gemma: bool  # Gemma-2: 4 RMSNorms per layer computed in fp32 as x * (1 + w), embeddings scaled by sqrt(d)
    final_softcap: float | None  # Gemma-2 final-logit softcapping (vanilla HF builds 3 extra S x V tensors)

    def __post_init__(self) -> None:
        for name, key in CONFIG_SIZES.items():  # unlike a raw config, a spec has no None left to default
            check_positive_int(key, getattr(self, name))
        check_config_sizes({key: getattr(self, name) for name, key in CONFIG_SIZES.items()}
                           | {"final_logit_softcapping": self.final_softcap})  # head grouping, softcap

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> "ModelSpec":
        """The spec of an HF config; ValueError for other families and for sizes that are not positive integers.

        Missing ``head_dim`` / ``num_key_value_heads`` (None) follow HF's defaults (d / heads, heads); explicit
        zeros are errors, not defaults.
        """
        model_type = getattr(config, "model_type", "?")
        if model_type not in FAMILIES:
            raise ValueError(f"the memory planner models {', '.join(FAMILIES)}; got model_type {model_type!r}")
        hidden, heads = config.hidden_size, config.num_attention_heads
        check_positive_int("hidden_size", hidden)  # both are needed to derive head_dim below
        check_positive_int("num_attention_heads", heads)
        head_dim = getattr(config, "head_dim", None)
        kv_heads = getattr(config, "num_key_value_heads", None)
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(model_type=model_type, hidden=hidden, intermediate=config.intermediate_size,
                   layers=config.num_hidden_layers, heads=heads, kv_heads=heads if kv_heads is None else kv_heads,
                   head_dim=hidden // heads if head_dim is None else head_dim,
                   vocab=config.vocab_size, tied=bool(getattr(config, "tie_word_embeddings", False)),
                   attn_bias=attention_bias or model_type == "qwen2", out_bias=attention_bias,
                   mlp_bias=bool(getattr(config, "mlp_bias", False)), gemma=model_type == "gemma2",
                   final_softcap=getattr(config, "final_logit_softcapping", None))

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def norms_per_layer(self) -> int:
        return 4 if self.gemma else 2

    def layer_param_shapes(self) -> list[int]:
        """Element counts of one decoder layer's parameter tensors."""
        d, inter = self.hidden, self.intermediate
        flat = [d * self.q_dim, d * self.kv_dim, d * self.kv_dim, self.q_dim * d] + [d * inter] * 3
        if self.attn_bias:
            flat += [self.q_dim, self.kv_dim, self.kv_dim]
        if self.out_bias:
            flat.append(d)
        if self.mlp_bias:
            flat += [inter, inter, d]
        return flat + [d] * self.norms_per_layer

    def layer_linears(self) -> list[tuple[int, int]]:
        """(in, out) features of one layer's seven projections: q, k, v, o, gate, up, down."""
        d, inter = self.hidden, self.intermediate
        return [(d, self.q_dim), (d, self.kv_dim), (d, self.kv_dim), (self.q_dim, d), (d, inter), (d, inter),
                (inter, d)]

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
        """Rotary ``inv_freq`` and ``original_inv_freq`` (fp32, head_dim / 2 each)."""
        return 2 * FP32 * (self.head_dim // 2)


@dataclass(frozen=True)
class Workload:
    """One training step to plan (see ``mst.memory.plan``)."""

    seq_len: int
    strategy: str = "mst"
    batch_size: int = 1
    sp: int = 1  # Ulysses sequence-parallel size (GPUs)
    dtype: torch.dtype = torch.bfloat16
    optimizer: str = "adamw"
    grad_accumulation: bool = False
    device: str = "cuda"  # "cpu" counts offloaded checkpoints as resident and uses CPU AdamW's for-loop
    mst_options: tuple = ()  # extra ``mst.apply`` options as (name, value) pairs (traced engine only)
    quantization: str | None = None  # "int8" | "nf4": frozen k-bit projections + LoRA (mst.memory.quantization)
    lora_rank: int = 16

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose from {', '.join(STRATEGIES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        for name, label in (("seq_len", "seq_len"), ("batch_size", "batch_size"), ("sp", "sp (gpus)"),
                            ("lora_rank", "lora_rank")):
            check_positive_int(label, getattr(self, name))
        if self.seq_len % self.sp:
            raise ValueError(f"seq_len {self.seq_len} is not divisible by the sequence-parallel size {self.sp}")
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {self.quantization!r}; choose from {', '.join(QUANTIZATIONS)}")
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype}")

    @property
    def local_seq(self) -> int:
        """Tokens of the sequence one rank holds (MLP, norms, LM head and checkpoints run on this shard)."""
        return self.seq_len // self.sp

    @property
    def tokens(self) -> int:
        """T: tokens per rank (batch x local sequence)."""
        return self.batch_size * self.local_seq

    @property
    def act_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

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
        if spec.heads % self.sp or spec.kv_heads % self.sp:
            raise ValueError(f"sequence-parallel size {self.sp} must divide the attention heads ({spec.heads}) "
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
