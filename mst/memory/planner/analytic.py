"""Analytic engine: the paper's memory model (Theorems 1-3) with the exact tensor sizes of an HF decoder layer.

Each term below is a tensor that HF's Llama-style code (or MsT's ops) creates, named as in the code, for the local
shard of T tokens (legend: a = bytes per activation element, f = 4 for fp32, X = a T d one hidden state,
Xf = f T d its fp32 copy, R = f T an RMSNorm rstd, Q = a T H hd, KV = a T Hkv hd, LSE = f T H, Mi = a T I one MLP
intermediate, C = the chunk of a mini-sequence):

- RMSNorm saves x in fp32 (Xf: the input itself in fp32, a copy in bf16), rstd (R) and the normalised x cast back
  (X; a Gemma norm keeps it in fp32, Xf); its backward makes five Xf temporaries at once in bf16 (pow, mean, rsqrt
  paths; four in fp32, where there are no casts).
- Attention saves q and k after RoPE, v, the output (which o_proj reuses as its input) and the fp32 logsumexp of a
  flash kernel: 2Q + 2KV + LSE. The projections' inputs are the norm outputs.
- The MLP saves gate, act(gate), up and their product: 4 Mi; its backward holds three more (dp, d act, d up).
- MsT's MLP keeps only its input; backward recomputes one chunk of C = 2d tokens (6 chunk intermediates), writes an
  X-sized input gradient and keeps fp32 weight-gradient accumulators (3 f d I) plus the chunk's bf16 gradients.
- HF's loss upcasts the T x V logits to fp32 and saves log_softmax (f T V); its backward holds two more f T V.
- MsT's LM head forms its gradients in forward, per chunk of C = max(T / ceil(V/d), d/4) tokens: two f C V (logits,
  log-softmax), the a C V logits gradient and its fp32 copy; it keeps dh (X) and a V x d weight-gradient accumulator
  (fp32 for low-precision weights) until backward casts and hands them over.

The family's facts (``ModelSpec``, read from ``mst.integrations.FAMILIES``; ``Family`` documents each) change these
terms: Gemma norms keep the normalised x in fp32 and Gemma-2/3 have four norms a layer (the MLP's backward starts in
the post-MLP norm); q/k norms (Qwen3, Gemma-3, optionally Cohere) keep a norm's tensors over Q and KV and add their
backward peaks; Phi-3's fused q|k|v output stays whole behind v's view, its gate|up output lives whole through the
product, and its concatenating RoPE makes o_proj's input a copy (one more Q); Cohere's parallel block has one
LayerNorm (x - mean twice and the normalised x, all fp32), one norm output feeding attention and MLP (the MLP's input
gradient waits for the attention's) and fp32 RoPE (fp32 copies of q and k in forward, recompute and backward).
Which terms are exact and where the peak lands is checked per family against the traced engine.

With checkpointing a layer keeps only its input (X) and its backward first recomputes the forward (Theorem 2); MsT
shrinks what that recompute and the LM head hold (Theorem 3). ``compose`` turns these profiles into the step peak.
Checked against the traced engine and against measured CPU steps in ``tests/memory``.
"""
from __future__ import annotations

from ...ops import default_mlp_chunk_tokens
from .compose import HeadProfile, LayerProfile, adam_step_temporaries
from .spec import FP32, INT64, ModelSpec, Workload, lm_head_chunk


class _Sizes:
    """The tensor sizes of the module docstring for one model and workload."""

    def __init__(self, spec: ModelSpec, wl: Workload):
        a, t = wl.act_bytes, wl.tokens
        self.a, self.t, self.spec, self.wl = a, t, spec, wl
        self.X, self.Xf, self.R = a * t * spec.hidden, FP32 * t * spec.hidden, FP32 * t
        self.Q, self.KV, self.LSE = a * t * spec.q_dim, a * t * spec.kv_dim, FP32 * t * spec.heads
        self.Mi = a * t * spec.intermediate
        chunk = default_mlp_chunk_tokens(spec.hidden)
        self.split = wl.chunked and t > chunk  # MsT's MLP chunk C tokens, no split when T <= C
        self.mlp_w = a * spec.hidden * spec.intermediate  # one MLP weight (or its gradient)
        self.Mc = a * chunk * spec.intermediate  # one chunk intermediate, a C I
        self.low = a < FP32  # bf16/fp16: RMSNorm and the losses make fp32 copies
        self.train_w = not wl.frozen  # quantized training: base weights make no gradients (LoRA's are negligible)
        # a k-bit projection is dequantized to the compute dtype for each matmul: one weight-sized transient
        self.dequant = a * max(fan_in * fan_out for fan_in, fan_out in spec.layer_linears()) if wl.frozen else 0
        # bitsandbytes' int8 matmul keeps its input as a ctx attribute, not a saved tensor, so checkpointing cannot
        # drop it: the q/k/v input, o_proj's input and (unless MsT's MLP runs it without a graph) the MLP's inputs
        # (a parallel block's MLP input is the attention's)
        mlp_in = (0 if spec.family.parallel_block else self.X) + self.Mi
        self.int8_kept = (self.X + self.Q + (0 if self.split else mlp_in)
                          if wl.quantization == "int8" and wl.checkpointed else 0)
        # one norm (see norm_saved); its output is saved by the next op
        self.norm = self.norm_saved(self.Xf, self.X, t)
        self.norm_bwd = self.norm_backward(self.Xf)
        self.att = 2 * self.Q + 2 * self.KV + self.LSE  # q, k after RoPE, v, output (o_proj's input), logsumexp
        if spec.family.fused_qkv:  # v is a view of the fused q|k|v output, which stays whole (Q + 2 KV instead of KV)
            self.att += self.Q + self.KV
        if spec.family.rope_cat:  # q, k after RoPE are contiguous (B, H, S, hd) copies, and so is the attention output:
            self.att += self.Q  # o_proj's input is a transposed copy of it
        # q/k norms (Qwen3, Gemma-3, Cohere's optional ones): each keeps what a hidden-state norm of the family's
        # kind keeps (norm_saved), over q / k, with an rstd per head
        self.Qf, self.KVf = FP32 * t * spec.q_dim, FP32 * t * spec.kv_dim
        self.q_norm = self.norm_saved(self.Qf, self.Q, t * spec.heads) if spec.family.qk_norm else 0
        self.qk_norm = self.q_norm + self.norm_saved(self.KVf, self.KV, t * spec.kv_heads) if spec.family.qk_norm else 0
        self.att += self.qk_norm
        # fp32 RoPE (Cohere, bf16/fp16): q and k are cast to fp32 first (both copies live to the end), then q's
        # cos, rotate_half and sin products; then k's, with q's fp32 result waiting
        self.rope_fp32_fwd = max(4 * self.Qf + self.KVf, 2 * self.Qf + 4 * self.KVf)

    def norm_saved(self, fp32_size: int, size: int, rows: int) -> int:
        """What one norm keeps for backward over a tensor of ``size`` bytes (``fp32_size`` in fp32) and ``rows``
        normalised rows: "rms": its fp32 input, rstd and the normalised x cast back; "gemma": the normalised x stays
        fp32; "layer" (Cohere): the mean-centred x twice (x - mean is computed again for the product) and the
        normalised x, all fp32, and rstd (not its input)."""
        if self.spec.family.norm == "layer":
            return 3 * fp32_size + FP32 * rows
        return fp32_size + FP32 * rows + (fp32_size if self.spec.family.norm == "gemma" else size)

    def norm_backward(self, fp32_input: int) -> int:
        """Peak of a norm's backward over its fp32 input (``fp32_input`` bytes): that input and five fp32
        temporaries of its size (four in fp32: no casts)."""
        return (5 if self.low else 4) * fp32_input + fp32_input

    def layer_saved_vanilla(self) -> int:
        """Every activation autograd keeps for one layer's backward (Theorem 1's A_mem x S)."""
        # the outputs of the input norm and of the pre-MLP norm feed saving matmuls (one norm output feeds both
        # attention and MLP in a parallel block)
        outputs = (1 if self.spec.family.parallel_block else 2) * self.X
        return self.spec.family.norms_per_layer * self.norm + outputs + self.att + 4 * self.Mi


def _layer(z: _Sizes) -> LayerProfile:
    """Saved bytes and the forward/backward peaks of one decoder layer (see the module docstring)."""
    s, wl, X = z.spec, z.wl, z.X
    in_backward = wl.optimizer == "adamw_in_backward" and not wl.grad_accumulation
    # checkpointed input (fp32: it is the first RMSNorm's input; a LayerNorm keeps x - mean instead)
    ckpt = X if wl.checkpointed and (z.low or s.family.norm == "layer") else 0
    nomlp = z.layer_saved_vanilla() - 4 * z.Mi  # norms, their outputs, attention
    sandwich = s.family.norms_per_layer == 4  # Gemma-2/3: a norm after attention and after the MLP too
    post = (z.norm if sandwich else 0)  # the post-MLP norm is done (freed) when the MLP backward starts
    if wl.checkpointed:
        saved = X + z.int8_kept
        # chunk intermediates (a fused gate|up output lives whole until the product), chunk outputs and their cat
        inter = 4 if s.family.fused_gate_up else 3
        mlp_fwd = inter * z.Mc + 3 * X if z.split else inter * z.Mi
        # input, norm output, q, k, v + RoPE's q cos, rotate_half, its sin (then k's, with q's result waiting)
        attn_fwd = 2 * X + z.Q + 2 * z.KV + max(3 * z.Q, z.Q + 3 * z.KV)
        if s.family.rope_fp32 and z.low:
            attn_fwd = 2 * X + z.Q + 2 * z.KV + z.rope_fp32_fwd
        if s.family.rope_cat:  # at the output's transposed copy: v (the whole q|k|v if fused), q, k, the output and copy
            attn_fwd = max(attn_fwd, 2 * X + (z.Q + 2 * z.KV if s.family.fused_qkv else z.KV) + 3 * z.Q + z.KV)
        if s.family.qk_norm:  # input, norm output, q's projection (a copy in bf16), its fp32 copy and x * rstd
            attn_fwd = max(attn_fwd, 2 * X + (z.Q if z.low else 0) + 2 * z.Qf + 2 * FP32 * z.t * s.heads)
        fwd_peak = max(3 * X + mlp_fwd, attn_fwd)  # input, h1 and the MLP input live through the MLP
    else:
        saved = z.layer_saved_vanilla()
        fwd_peak = saved + 2 * X + (2 * X if z.low else 0)  # + output, down-proj output (+ input, h1 in bf16)
        if s.family.parallel_block:  # input + attention out + MLP out at the final sum: input, both outputs, partial sum
            fwd_peak = saved + 5 * X
        if s.family.rope_fp32 and z.low:  # or at the fp32 RoPE: input, the norm's saved tensors and output, q, k, v
            fwd_peak = max(fwd_peak, 2 * X + z.norm + z.qk_norm + z.Q + 2 * z.KV + z.rope_fp32_fwd)
    dh, mlp_grads = X, 3 * z.mlp_w * z.train_w
    attn_grads = z.a * 2 * s.hidden * (s.q_dim + s.kv_dim) * z.train_w
    accumulators = (3 * FP32 * s.hidden * s.intermediate + 4 * z.mlp_w) * z.train_w
    before_mlp = ckpt + nomlp - post + dh
    if z.split:  # chunk loop: 6 chunk intermediates, input-gradient buffer, fp32 accumulators + chunk gradients
        # (Gemma-2: the MLP's output gradient comes from the post-MLP norm and lives through the loop)
        before_mlp += X if sandwich else 0
        points = {"mlp": (before_mlp + X + 6 * z.Mc + accumulators, 0),
                  "mlp_end": (before_mlp + 2 * X + mlp_grads, mlp_grads)}
        if z.low and z.train_w:  # the accumulators are cast back to bf16 while still alive
            points["mlp_cast"] = (before_mlp + X + 3 * FP32 * s.hidden * s.intermediate + 6 * z.mlp_w, 0)
    else:  # gate, act, up + dp, d act, d up (the product is released) and the down-proj weight gradient
        points = {"mlp": (before_mlp + 6 * z.Mi + z.mlp_w * z.train_w, z.mlp_w * z.train_w)}
    if sandwich:  # the backward starts in the post-MLP norm, with everything else still saved
        # (fp32: five fp32 temporaries here, one more than a pre-norm's backward has, as the traced engine shows;
        # in bf16 every norm's backward has five)
        points["post_norm"] = (ckpt + nomlp + (0 if z.split else 4 * z.Mi) + dh + z.norm_bwd - z.norm
                               + (0 if z.low else z.Xf), 0)
    first = z.norm + X  # the input norm's saved tensors and its output
    if s.family.parallel_block:  # no pre-MLP norm: the MLP's input gradient waits for the attention's
        first += X
    else:
        points["norm2"] = (ckpt + first + z.att + (z.norm if sandwich else 0) + z.norm_bwd + dh + mlp_grads,
                           mlp_grads)
    # the attention backward: dq, dk, dv and the output's gradient (o_proj's backward freed a transposed copy)
    att_left = z.att - (z.Q if s.family.rope_cat else 0)
    points["attn"] = (ckpt + first + att_left + dh + 2 * z.Q + 2 * z.KV + mlp_grads, mlp_grads)
    if s.family.rope_fp32 and z.low:  # q's fp32 RoPE backward: its fp32 gradient and three temporaries, k's fp32 gradient
        # and v's (the attention's saved tensors are gone, the q/k norms' not yet)
        o = z.a * s.hidden * s.q_dim * z.train_w
        points["rope"] = (ckpt + first + z.qk_norm + dh + z.KV + z.KVf + 4 * z.Qf + mlp_grads + o, mlp_grads + o)
        if wl.checkpointed:  # the recomputed forward's fp32 RoPE of q (see attn_fwd), the norm's saved tensors kept
            points["rope_recompute"] = (ckpt + z.norm + X + z.qk_norm + dh + z.Q + 2 * z.KV + z.rope_fp32_fwd, 0)
    if s.family.qk_norm:  # k's norm backward with q's norm saved and q's gradient waiting, then q's norm backward
        q_saved = z.q_norm
        if s.family.qk_norm_interleaved:  # (Qwen3) v's projection backward ran first: its input gradient (X) waits
            o_v, o_v_k = (z.a * s.hidden * (s.q_dim + n * s.kv_dim) * z.train_w for n in (1, 2))
            k_point, k_grads = ckpt + first + dh + X + q_saved + z.Q, mlp_grads + o_v
            q_point, q_grads = ckpt + first + dh + X, mlp_grads + o_v_k
        else:  # (Gemma-3, Cohere) the norms follow all three projections: v's gradient (then k's too) waits
            o = z.a * s.hidden * s.q_dim * z.train_w
            k_point, k_grads = ckpt + first + dh + z.KV + q_saved + z.Q, mlp_grads + o
            q_point, q_grads = ckpt + first + dh + 2 * z.KV, mlp_grads + o
        points["k_norm"] = (k_point + z.norm_backward(z.KVf) + k_grads, k_grads)
        points["q_norm"] = (q_point + z.norm_backward(z.Qf) + q_grads, q_grads)
    points["norm1"] = (ckpt + z.norm_bwd + dh + mlp_grads + attn_grads, mlp_grads + attn_grads)
    if in_backward:  # each gradient is freed after its update; updating an MLP weight adds its temporaries
        step = adam_step_temporaries(wl.device, True) * z.mlp_w * z.train_w
        points = {k: (v - g, 0) for k, (v, g) in points.items()}
        points["update"] = (before_mlp + 2 * X + mlp_grads + step, 0)
    bwd_peak, grads = max(points.values())
    # the layer's own int8-kept inputs live until autograd reaches their matmuls in this backward
    return LayerProfile(saved=saved, fwd_peak=fwd_peak + z.dequant, bwd_peak=bwd_peak + z.dequant + z.int8_kept,
                        bwd_peak_grads=grads,
                        offloadable=X if wl.checkpointed else 0)


def _head(z: _Sizes) -> HeadProfile:
    """Final norm + LM head + loss, the shared tensors and the embedding backward."""
    s, wl, a, t, X, f = z.spec, z.wl, z.a, z.t, z.X, FP32
    V, d = s.vocab, s.hidden
    labels = INT64 * wl.batch_size * (wl.local_seq + 1) + (INT64 * t if wl.batch_size > 1 else 0)
    shared = s.rope_sets * 2 * a * wl.local_seq * s.rotary_dim + INT64 * wl.local_seq  # rotary cos, sin; positions
    # final norm (fp32 models keep its input, the last hidden state, as its fp32 input) and its output
    base = z.norm + X
    lm_grad, norm_grad = a * V * d * z.train_w, a * d * z.train_w
    in_backward = wl.optimizer == "adamw_in_backward" and not wl.grad_accumulation
    softcap = f if s.final_softcap else 0  # MsT keeps tanh(z / cap) per chunk; HF keeps it for all T x V
    if wl.chunked:  # gradients formed in forward, chunk by chunk; backward casts dW and hands them over
        chunk = lm_head_chunk(s, t)
        acc = (f if z.low else a) * V * d * z.train_w  # the V x d weight gradient, in fp32 for bf16/fp16 weights
        saved = base + labels + acc  # base's X: the norm output is released, dh (the same size) kept instead
        loop = saved + X + t + 2 * f * t + INT64 * t  # the input hidden, valid mask, token weights, losses, labels
        # per chunk: fp32 logits and log-softmax (exp'd in place into the logits gradient), the softcap's tanh, the
        # gradient in the weight dtype and its fp32 copy (with the chunk's input) for the fp32 dW accumulation
        fwd_peak = loop + (2 * f + softcap + (a if z.low else 0)) * chunk * V + (f * chunk * d if z.low else 0)
        # (a tied head's gradient waits in autograd's buffer for the embedding's, not in .grad)
        bwd_peak, bwd_grads = saved + (lm_grad if z.low else 0), 0 if s.tied else lm_grad
        after_head = saved - acc  # handing over dh and dW: the accumulator is gone
    else:
        logits = a * t * V
        saved = base + labels + f * t * V + (logits if s.final_softcap else 0)
        fwd_peak = base + labels + f * t * V + (f * t * V if z.low else 0) + logits * (2 if s.final_softcap else 1)
        bwd_peak, bwd_grads = saved - labels + 2 * f * t * V, 0
        after_head = saved + X  # the saved activations and dh
    # the final norm's backward (its fp32 input + temporaries) runs with the V x d gradient already made
    norm_point = z.norm_bwd + (0 if in_backward and not s.tied else lm_grad)
    if norm_point > bwd_peak:
        bwd_peak, bwd_grads = norm_point, 0 if s.tied or in_backward else lm_grad
    # the tied head's V x d gradient waits in autograd's buffer for the embedding's; the two are then summed
    # out of place (3 V x d at once) before the single accumulation
    emb_in = X * (2 if s.family.embed_scale else 1)  # Gemma scales the embedding output: its gradient is one more X
    step = adam_step_temporaries(wl.device, True) * lm_grad if in_backward else 0
    if s.tied:
        end, end_grads = X + norm_grad + lm_grad, norm_grad
        emb_peak, emb_grads = norm_grad + max(emb_in + 2 * lm_grad, 3 * lm_grad), norm_grad + lm_grad
    else:
        end, end_grads = X + norm_grad + lm_grad, norm_grad + lm_grad
        emb_peak, emb_grads = end - X + emb_in + lm_grad, end_grads + lm_grad
    if in_backward:  # gradients are freed after their update (the embedding's adds its update temporaries)
        if not s.tied:  # (MsT's peak is the dW cast, before the update, with the gradient alive)
            bwd_peak = max(bwd_peak - (0 if wl.chunked else bwd_grads), after_head + lm_grad + step)
            end, emb_peak = X, max(emb_in + lm_grad, lm_grad + step)
        else:
            end, emb_peak = X + lm_grad, max(emb_peak - norm_grad, lm_grad + step)
        bwd_grads = end_grads = emb_grads = 0
    if not z.train_w:  # frozen embedding: the backward stops at the first layer's input
        emb_peak = emb_grads = 0
    return HeadProfile(shared=shared, fwd_peak=fwd_peak, saved=saved, bwd_peak=bwd_peak, bwd_peak_grads=bwd_grads,
                       bwd_end=end, bwd_end_grads=end_grads, embed_bwd_peak=emb_peak, embed_bwd_peak_grads=emb_grads)


def analytic_profiles(spec: ModelSpec, wl: Workload) -> tuple[LayerProfile, HeadProfile]:
    """Layer and head profiles of ``spec`` under ``wl`` from the closed-form sizes above; ValueError for a family
    whose terms it lacks (``Family.analytic_gap``)."""
    if spec.family.analytic_gap:
        raise ValueError(f"the analytic engine cannot plan {spec.model_type!r}: {spec.family.analytic_gap}; use "
                         "engine='traced' (python -m mst plan --engine traced)")
    sizes = _Sizes(spec, wl)
    return _layer(sizes), _head(sizes)
