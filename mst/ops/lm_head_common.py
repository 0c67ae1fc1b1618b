"""What the two chunked LM-head losses share: their settings, the chunk rule, one chunk's loss math, HF's semantics.

``chunked_lm_head_loss`` (logits from the head's weight) and ``chunked_module_lm_head_loss`` (logits from the head
module) compute the same loss: per chunk of tokens, fp32 logits, optional logit scaling and final-logit
softcapping (Gemma-2/3), cross-entropy (optionally label-smoothed, plus a z-loss), and for gradients the
closed-form d(loss)/d(logits). Both read their settings from one ``LMHeadSpec`` and follow HF's
``ForCausalLMLoss`` for reductions and the divisor.

Per valid token, with p = softmax(z), lse = logsumexp(z), V the vocabulary, eps the label smoothing and lam the
z-loss scale (Liger-Kernel's ``lse_square_scale``, PaLM's z-loss):
    loss = (1 - eps) * -log p[y] + eps * mean_v(-log p[v]) + lam * lse^2     (torch's ``label_smoothing``)
    d loss / d z = (1 + 2 lam lse) * p - (1 - eps) * onehot(y) - eps / V
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

# the most elements one chunk's logits may have: 32-bit signed offsets still index every element, so no kernel that
# indexes with int32 (a known failure past 2^31 elements: Liger-Kernel's issue 803, FlashAttention-2) sees more
MAX_CHUNK_ELEMENTS = 2 ** 31 - 1


class TokenStats:
    """Per-token statistics of the logits, recorded by a chunked LM-head loss while each chunk's logits exist, so
    what trainers log or need (TRL's token accuracy, CCE's ``return_lse``) comes without N x V logits.

    After the loss's forward: ``lse`` (N,) fp32, the log-sum-exp of the finished logits (scaled / softcapped as the
    loss sees them), and ``predictions`` (N,) int64, their argmax, both flattened over batch x sequence. Tokens in a
    chunk the loss skipped (every label in it ignored) have lse NaN and prediction -1. The per-token log-probability
    of the label is the loss itself: ``reduction="none"`` gives -log p[y] with its gradient (no label smoothing or
    z-loss). Recorded in the forward only (not in recomputes); no gradient flows through them.
    """

    def __init__(self) -> None:
        self.lse: torch.Tensor | None = None
        self.predictions: torch.Tensor | None = None

    def record(self, start: int, z: torch.Tensor, n_tokens: int, lse: torch.Tensor | None = None) -> None:
        """One chunk's finished logits ``z`` (C, V) for tokens ``start .. start + C`` of ``n_tokens``."""
        if self.lse is None:
            self.lse = torch.full((n_tokens,), math.nan, dtype=torch.float32, device=z.device)
            self.predictions = torch.full((n_tokens,), -1, dtype=torch.long, device=z.device)
        with torch.no_grad():
            self.lse[start:start + z.shape[0]] = torch.logsumexp(z, dim=-1) if lse is None else lse
            self.predictions[start:start + z.shape[0]] = z.argmax(dim=-1)

    def z_loss(self, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """The z-loss term alone, mean of logsumexp(logits)^2 over the tokens with a valid label (what Liger-Kernel
        returns separately for logging; multiply by the scale), without gradient."""
        if self.lse is None:
            raise ValueError("TokenStats.z_loss: nothing recorded yet (run the loss first)")
        valid = labels.reshape(-1).to(self.lse.device) != ignore_index
        return self.lse[valid].square().mean()

    def accuracy(self, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """The fraction of tokens with a valid (aligned, i.e. shifted) label whose prediction is that label (NaN
        when every label is ignored), as TRL's SFTTrainer logs it."""
        if self.predictions is None:
            raise ValueError("TokenStats.accuracy: nothing recorded yet (run the loss first)")
        labels = labels.reshape(-1).to(self.predictions.device)
        valid = labels != ignore_index
        return (self.predictions[valid] == labels[valid]).float().mean()


def record_stats(spec: "LMHeadSpec", start: int, z: torch.Tensor, n_tokens: int,
                 lse: torch.Tensor | None = None) -> None:
    """``spec.stats.record`` when the caller asked for statistics."""
    if spec.stats is not None:
        spec.stats.record(start, z, n_tokens, lse)


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: ``divisor`` is a tensor, compared by identity
class LMHeadSpec:
    """How a chunked LM-head loss is computed; one argument of its autograd Functions instead of a dozen.

    chunk_tokens: tokens per chunk (C). ignore_index: the label of tokens that do not count.
    logit_scale: the logits are multiplied by it (None: not scaled). softcap: final-logit softcapping,
    ``softcap * tanh(z / softcap)`` (None: none). divisor: what the summed loss is divided by -- the mean's count
    of valid labels or HF's ``num_items_in_batch``, a tensor (None: the plain sum; per-token losses have none).
    weight_grad_block_rows: for a summed loss from the head's weight, make the weight gradient in backward this many
    vocabulary rows at a time instead of in a V x d fp32 buffer (None: the buffer).
    stats: where the forward records per-token statistics (``TokenStats``; None: not recorded).
    class_weights: (V,) weight of each target class, as ``F.cross_entropy(weight=)``: a token's loss is scaled by
    its label's weight and a mean divides by the summed weights of the valid labels (not with label smoothing or a
    z-loss).
    """

    chunk_tokens: int
    ignore_index: int = -100
    logit_scale: float | None = None
    softcap: float | None = None
    divisor: torch.Tensor | int | None = None
    weight_grad_block_rows: int | None = None
    label_smoothing: float = 0.0  # eps above
    z_loss: float = 0.0  # lam above
    stats: TokenStats | None = None
    class_weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing <= 1.0:  # also refuses NaN
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing!r}")
        if not 0.0 <= self.z_loss < math.inf:
            raise ValueError(f"z_loss must be a finite number >= 0, got {self.z_loss!r}")
        if self.class_weights is not None and (self.label_smoothing or self.z_loss):
            raise ValueError("class_weights cannot be combined with label_smoothing or z_loss")

    @property
    def plain(self) -> bool:
        """Plain cross-entropy (class-weighted or not): no label smoothing, no z-loss."""
        return not self.label_smoothing and not self.z_loss

    def weights(self, z: torch.Tensor) -> torch.Tensor | None:
        """The class weights in the dtype and on the device of the logits ``z`` (None without)."""
        return None if self.class_weights is None else self.class_weights.to(z.device, z.dtype)

    def token_weight(self, labels: torch.Tensor) -> torch.Tensor | float:
        """Each token's class weight (labels clamped: ignored tokens are zeroed elsewhere); 1 without weights."""
        return 1.0 if self.class_weights is None else self.class_weights.to(labels.device).float()[labels.clamp_min(0)]


def lm_head_chunk_tokens(n_tokens: int, vocab_size: int, hidden_size: int, *, chunk_tokens: int | None = None,
                         num_chunks: int | None = None, logits_budget_bytes: int | None = None) -> int:
    """Tokens per LM-head chunk. Default: M = ceil(V / d) chunks (the paper's rule: 32 for Llama3, 72 for Gemma-2)
    but never fewer than d / 4 tokens per chunk, so short sequences do not run 32-token chunks (11x slower than
    unchunked at S=1024 in the paper) while long ones, where memory matters, chunk exactly as the paper does
    (measured in experiments/table13_16: same max lengths; a d-token floor would cost Gemma-2-9B a third of its max length).

    Exactly one of ``chunk_tokens`` / ``num_chunks`` / ``logits_budget_bytes`` may be given; the byte budget bounds
    one chunk's fp32 logits (C x V x 4 bytes). The default and ``num_chunks`` rules never give a chunk whose logits
    exceed ``MAX_CHUNK_ELEMENTS`` (Llama3's V: from 536K tokens on, 16,743 tokens a chunk instead of N / 32); an
    explicit ``chunk_tokens`` or byte budget is taken as given.
    """
    given = [v is not None for v in (chunk_tokens, num_chunks, logits_budget_bytes)]
    if sum(given) > 1:
        raise ValueError("give at most one of chunk_tokens, num_chunks, logits_budget_bytes")
    if chunk_tokens is not None:
        if chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens}")
        return int(chunk_tokens)
    if logits_budget_bytes is not None:
        if logits_budget_bytes < vocab_size * 4:
            raise ValueError(f"logits_budget_bytes={logits_budget_bytes} is below one token's fp32 logits "
                             f"({vocab_size * 4} bytes)")
        return int(logits_budget_bytes // (vocab_size * 4))
    cap = max(1, MAX_CHUNK_ELEMENTS // vocab_size) if vocab_size > 0 else n_tokens
    if num_chunks is None:
        num_chunks = math.ceil(vocab_size / hidden_size)
        return min(max(1, math.ceil(n_tokens / num_chunks), math.ceil(hidden_size / 4)), cap)
    if num_chunks <= 0:
        raise ValueError(f"num_chunks must be a positive integer, got {num_chunks}")
    return min(max(1, math.ceil(n_tokens / num_chunks)), cap)


def _finish_logits(z: torch.Tensor, spec: LMHeadSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and softcap the upcast logits ``z`` in place (``z`` must be a tensor of the caller's own); also
    tanh(z/cap) when softcapping (needed for its derivative)."""
    if spec.logit_scale is not None:
        z.mul_(spec.logit_scale)
    if spec.softcap is None:
        return z, None
    t = z.div_(spec.softcap).tanh_()
    return t * spec.softcap, t


def token_losses(z: torch.Tensor, labels: torch.Tensor, spec: LMHeadSpec) -> torch.Tensor:
    """Per-token loss of one chunk's finished fp32 logits ``z`` (0 where ignored)."""
    if spec.plain:
        return F.cross_entropy(z, labels, weight=spec.weights(z), ignore_index=spec.ignore_index, reduction="none")
    lse = torch.logsumexp(z, dim=-1) if spec.z_loss else None
    return losses_from_log_probs(torch.log_softmax(z, dim=-1), labels, spec, lse)


def losses_from_log_probs(logp: torch.Tensor, labels: torch.Tensor, spec: LMHeadSpec,
                          lse: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token loss from one chunk's log-probabilities (0 where ignored); ``lse`` is needed for a z-loss."""
    losses = F.nll_loss(logp, labels, weight=spec.weights(logp), ignore_index=spec.ignore_index, reduction="none")
    if spec.plain:
        return losses
    valid = labels != spec.ignore_index
    if spec.label_smoothing:
        losses = (1.0 - spec.label_smoothing) * losses - spec.label_smoothing * logp.mean(dim=-1) * valid
    if spec.z_loss:
        losses = losses + spec.z_loss * lse.square() * valid
    return losses


def softmax_and_lse(z: torch.Tensor, spec: LMHeadSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A recomputed chunk's softmax (what ``_logits_gradient`` starts from) and, for a z-loss, its log-sum-exp
    (taken first: its temporaries come and go before the softmax exists)."""
    lse = torch.logsumexp(z, dim=-1) if spec.z_loss else None
    return torch.softmax(z, dim=-1), lse


def _logits_gradient(dz: torch.Tensor, t: torch.Tensor | None, labels: torch.Tensor, tok_w: torch.Tensor,
                     spec: LMHeadSpec, hits: torch.Tensor | float = 1.0, lse: torch.Tensor | None = None,
                     vocab: int | None = None) -> torch.Tensor:
    """d(loss)/d(raw logits) of one chunk, in place on its softmax ``dz``: (softmax - onehot) x per-token weight
    (with label smoothing and z-loss: the module docstring's formula), times the softcap and scale derivatives.
    ``labels`` are clamped (ignored tokens have weight 0); ``hits`` is 1 where a token's label column lies in ``dz``
    (a vocabulary block may not hold it; ``vocab`` is then the whole vocabulary's size); ``lse`` each token's
    log-sum-exp, needed for a z-loss."""
    rows = torch.arange(dz.shape[0], device=dz.device)
    if spec.z_loss:
        dz.mul_(lse.mul(2.0 * spec.z_loss).add_(1.0)[:, None])
    dz[rows, labels] -= hits * (1.0 - spec.label_smoothing)
    if spec.label_smoothing:
        dz.sub_(spec.label_smoothing / (vocab or dz.shape[1]))
    dz.mul_(tok_w[:, None])
    if t is not None:  # d(cap * tanh(z/cap))/dz = 1 - tanh^2
        dz.mul_(t.square_().neg_().add_(1.0))
    if spec.logit_scale is not None:
        dz.mul_(spec.logit_scale)
    return dz


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _flatten_tokens(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, d) hidden states and (N,) labels on their device, after checking that they align."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not align")
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    return flat_h, labels.reshape(-1).to(flat_h.device)


def _loss_divisor(labels: torch.Tensor, ignore_index: int, reduction: str,
                  num_items_in_batch: int | torch.Tensor | None,
                  class_weights: torch.Tensor | None = None) -> torch.Tensor | None:
    """What the summed loss is divided by: for "mean", HF's ``num_items_in_batch`` if given, else the global count
    of valid labels (0 when all are ignored: a NaN loss, as HF's), with class weights their sum over the valid
    labels (``F.cross_entropy``'s mean); None for "sum" / "none"."""
    if reduction != "mean":
        return None
    valid = labels != ignore_index
    if num_items_in_batch is not None:
        divisor = num_items_in_batch
    elif class_weights is not None:
        divisor = class_weights.to(labels.device).float()[labels[valid]].sum()
    else:
        divisor = valid.sum()
    # a tensor also for a Python number: HF divides the summed loss by it as a tensor (inf / NaN for 0)
    return torch.as_tensor(divisor, device=labels.device)


def _reduce(losses: torch.Tensor, per_token: bool, divisor: torch.Tensor | int | None) -> torch.Tensor:
    """The returned loss: per-token losses, or their sum over ``divisor`` (None: the plain sum)."""
    if per_token:
        return losses
    total = losses.sum()
    return total / divisor if divisor is not None else total


def check_class_weights(class_weights: torch.Tensor | None, vocab_size: int) -> None:
    """ValueError unless ``class_weights`` is None or a (V,) tensor of finite weights >= 0."""
    if class_weights is None:
        return
    if not isinstance(class_weights, torch.Tensor) or class_weights.shape != (vocab_size,):
        raise ValueError(f"class_weights must be a tensor of shape ({vocab_size},) (one weight per class), got "
                         f"{getattr(class_weights, 'shape', type(class_weights).__name__)}")
    if not (torch.isfinite(class_weights).all() and (class_weights >= 0).all()):
        raise ValueError("class_weights must be finite and >= 0")
