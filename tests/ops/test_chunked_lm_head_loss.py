"""chunked_lm_head_loss against ``F.cross_entropy(F.linear(h, W, b).float(), y)``: loss and the gradients of h, W
and b must equal the reference (fp32, ``tests.utils.assert_exact``: assert_close defaults plus a 1e-5 normwise
bound) for every reduction, ignore pattern and chunking, and the official code's bugs (docs/paper.md §5.2 items 1, 2, 4,
6) must stay fixed."""
from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from mst.ops import chunked_lm_head_loss, lm_head_chunk_tokens
from mst.ops.lm_head_common import MAX_CHUNK_ELEMENTS
from tests.utils import MaxNumelMode, assert_exact

B, S, D, V = 2, 37, 16, 97  # B*S = 74 tokens; default M = ceil(97 / 16) = 7 chunks of 11 (remainder 8)


def reference_loss(h, w, y, *, bias=None, reduction="mean", num_items_in_batch=None, logit_scale=None,
                   final_logit_softcapping=None, ignore_index=-100):
    """The unchunked computation HF performs: fp32 logits, optional scale / softcap, then cross-entropy."""
    z = F.linear(h, w, bias).float()
    if logit_scale is not None:
        z = z * logit_scale
    if final_logit_softcapping is not None:
        z = torch.tanh(z / final_logit_softcapping) * final_logit_softcapping
    red = "sum" if num_items_in_batch is not None else reduction
    loss = F.cross_entropy(z.reshape(-1, w.shape[0]), y.reshape(-1), ignore_index=ignore_index, reduction=red)
    if num_items_in_batch is not None:
        return loss / num_items_in_batch
    return loss.view(y.shape) if reduction == "none" else loss


def make_inputs(shape=(B, S), bias=False, ignore_prefix=0):
    h = torch.randn(*shape, D, requires_grad=True)
    w = (torch.randn(V, D) * 0.3).requires_grad_()
    b = (torch.randn(V) * 0.1).requires_grad_() if bias else None
    y = torch.randint(0, V, shape)
    if ignore_prefix:
        y[..., :ignore_prefix] = -100
    return h, w, b, y


def loss_and_grads(fn, h, w, b, y, **kwargs):
    """(loss, [grads of h, w, b]) of fn on fresh leaf copies; reduction="none" is backpropagated with a random
    upstream gradient so per-token weights are tested too."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (h, w, b)]
    loss = fn(leaves[0], leaves[1], y, bias=leaves[2], **kwargs)
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3)) if loss.dim() else None
    if torch.isfinite(loss).all():
        loss.backward(upstream)
    return loss.detach(), [t.grad if t is not None else None for t in leaves]


def assert_matches_reference(h, w, b, y, chunking=None, **kwargs):
    got = loss_and_grads(chunked_lm_head_loss, h, w, b, y, **(chunking or {}), **kwargs)
    ref = loss_and_grads(reference_loss, h, w, b, y, **kwargs)
    assert_exact(got[0], ref[0], "loss")
    for name, g, r in zip(("hidden", "weight", "bias"), got[1], ref[1]):
        if r is None:
            assert g is None, name
        else:
            assert_exact(g, r, f"grad of {name}")
    return got


CHUNKINGS = {"auto": {}, "M1": {"num_chunks": 1}, "M2": {"num_chunks": 2}, "M7": {"num_chunks": 7},
             "C5": {"chunk_tokens": 5}, "budget": {"logits_budget_bytes": 9 * V * 4 + 3}}


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_prefix", [0, 9], ids=["all_valid", "ignored_prefix"])
def test_matches_reference(chunking, reduction, ignore_prefix):
    h, w, b, y = make_inputs(ignore_prefix=ignore_prefix)
    loss, _ = assert_matches_reference(h, w, b, y, CHUNKINGS[chunking], reduction=reduction)
    if reduction == "none":
        assert loss.shape == y.shape
        assert (loss[y == -100] == 0).all()


@pytest.mark.parametrize("shape", [(B * S,), (1, S), (2, 3, 11)], ids=["2d", "batch1", "4d"])
def test_input_ranks(shape):
    assert_matches_reference(*make_inputs(shape=shape, bias=True), {"chunk_tokens": 4})


def test_bias_and_remainder_chunk():
    """74 tokens in chunks of 8: a 2-token remainder chunk must contribute to loss and gradients."""
    h, w, b, y = make_inputs(bias=True, ignore_prefix=3)
    assert_matches_reference(h, w, b, y, {"chunk_tokens": 8})


def test_all_but_one_ignored():
    h, w, b, y = make_inputs()
    y.fill_(-100)
    y[1, -2] = 5
    loss, _ = assert_matches_reference(h, w, b, y, {"num_chunks": 7})
    assert loss > 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_is_hf_behaviour(reduction):
    """HF (F.cross_entropy mean over zero valid tokens) gives NaN loss and zero gradients; sum/none give 0."""
    h, w, b, y = make_inputs()
    y.fill_(-100)
    loss, grads = assert_matches_reference(h, w, b, y, {"num_chunks": 3}, reduction=reduction)
    if reduction == "mean":
        assert torch.isnan(loss)
    else:
        assert (loss == 0).all()
        assert all((g == 0).all() for g in grads if g is not None)


def test_all_ignored_gradient_is_zero_like_hf():
    """NaN mean loss still backpropagates zeros (what autograd gives for HF's loss), never NaNs."""
    h, w, _, y = make_inputs()
    y.fill_(-100)
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    chunked_lm_head_loss(h2, w2, y, num_chunks=3).backward()
    reference_loss(h, w, y).backward()
    for g, r in ((h2.grad, h.grad), (w2.grad, w.grad)):
        assert_exact(g, r)
        assert (g == 0).all()


@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_num_items_in_batch(as_tensor):
    """HF Trainer passes the token count of the whole accumulation window: loss = sum / num_items."""
    h, w, b, y = make_inputs(ignore_prefix=4)
    n = 3 * int((y != -100).sum())
    num_items = torch.tensor(n) if as_tensor else n
    assert_matches_reference(h, w, b, y, {"num_chunks": 4}, num_items_in_batch=num_items)


@pytest.mark.parametrize("op", ["weight", "module"])
def test_int_num_items_in_batch_zero_is_hf_behaviour(op):
    """HF divides the summed loss by num_items_in_batch as a tensor: inf for 0 (NaN when every label is ignored),
    never a ZeroDivisionError."""
    from mst.ops import chunked_module_lm_head_loss

    h, w, _, y = make_inputs(ignore_prefix=4)
    for labels in (y, torch.full_like(y, -100)):
        expected = reference_loss(h, w, labels, num_items_in_batch=0)
        if op == "weight":
            got = chunked_lm_head_loss(h, w, labels, num_chunks=3, num_items_in_batch=0)
        else:
            got = chunked_module_lm_head_loss(h, lambda x: F.linear(x, w), [w], labels, num_chunks=3,
                                              num_items_in_batch=0)
        torch.testing.assert_close(got, expected, equal_nan=True)


def test_softcapping_matches_tanh_reference():
    h, w, b, y = make_inputs(ignore_prefix=2)
    h = (h * 4).detach().requires_grad_()  # logits of a few units, so a cap of 2 is strongly nonlinear
    loss, _ = assert_matches_reference(h, w, b, y, {"num_chunks": 5}, final_logit_softcapping=2.0)
    assert not torch.allclose(loss, reference_loss(h, w, y)), "softcapping must change the loss"


def test_logit_scale():
    h, w, b, y = make_inputs(bias=True)
    loss, _ = assert_matches_reference(h, w, b, y, {"num_chunks": 3}, logit_scale=0.0625)
    assert not torch.allclose(loss, reference_loss(h, w, y, bias=b))


def test_scale_and_softcap_together():
    h, w, b, y = make_inputs()
    assert_matches_reference(h, w, b, y, {"chunk_tokens": 6}, logit_scale=3.0, final_logit_softcapping=1.5)


@pytest.mark.parametrize("n_tokens,num_chunks", [(3, 7), (32, 64), (1, 2)])
def test_fewer_tokens_than_chunks(n_tokens, num_chunks):
    """The official code returned loss 0 when S < M (docs/paper.md §5.2 item 4); here every token counts."""
    h, w, b, y = make_inputs(shape=(1, n_tokens))
    loss, _ = assert_matches_reference(h, w, b, y, {"num_chunks": num_chunks})
    assert loss > 0


def test_default_chunks_on_short_input():
    """Default on a 5-token input: the d/4 = 4-token floor gives a 4-token chunk and a 1-token remainder; still the
    full loss."""
    h, w, b, y = make_inputs(shape=(5,))
    assert lm_head_chunk_tokens(5, V, D) == 4
    assert_matches_reference(h, w, b, y)


@pytest.mark.parametrize("n_tokens, expected", [(1, 1024), (1024, 1024), (32 * 1024, 1024), (80_000, 2500)])
def test_default_chunk_rule_llama3_shapes(n_tokens, expected):
    """M = ceil(V/d) = 32 chunks for Llama3-8B (V=128256, d=4096), but never below d/4 = 1024 tokens a chunk."""
    assert lm_head_chunk_tokens(n_tokens, 128256, 4096) == expected


@pytest.mark.parametrize("n_tokens", [2 ** 19, 536_000, 2 ** 20, 2 ** 22])
@pytest.mark.parametrize("rule", [{}, {"num_chunks": 2}])
def test_chunk_logits_stay_indexable_with_int32(n_tokens, rule):
    """Past 2^31 elements int32-indexed kernels fail (Liger issue 803); the derived chunk rules keep one chunk's
    logits below that at any length (Llama3: V = 128256, d = 4096), and the chunks still cover every token."""
    chunk = lm_head_chunk_tokens(n_tokens, 128256, 4096, **rule)
    uncapped = -(-n_tokens // rule.get("num_chunks", 32))  # M = ceil(V / d) = 32 by default
    assert chunk == min(uncapped, MAX_CHUNK_ELEMENTS // 128256) and chunk * 128256 <= MAX_CHUNK_ELEMENTS


@pytest.mark.parametrize("num_chunks", [4, 8, 64])
@pytest.mark.parametrize("first_chunk_ignored", [False, True])
def test_weight_grad_is_not_doubled(num_chunks, first_chunk_ignored):
    """Official bug (docs/paper.md §5.2 item 1): |dW| / |dW_ref| was 2.000 at HEAD (1.0 when the first mini-sequence
    was fully ignored). Ours is exactly the reference gradient, whatever the data."""
    h, w, b, y = make_inputs(shape=(128,))
    if first_chunk_ignored:
        y[: 128 // num_chunks] = -100
    _, grads = assert_matches_reference(h, w, b, y, {"num_chunks": num_chunks})
    _, ref = loss_and_grads(reference_loss, h, w, b, y)
    assert math.isclose(float(grads[1].norm() / ref[1].norm()), 1.0, rel_tol=1e-5)


def test_gradient_accumulation_over_three_backwards():
    """Official bug (docs/paper.md §5.2 item 2): G_k = 2(G_{k-1} + g) gave 2g, 6g, 14g. Ours accumulates g, 2g, 3g,
    in the hidden states, the weight and the bias, exactly like the reference."""
    h, w, b, y = make_inputs(bias=True, ignore_prefix=5)
    leaves = {k: t.detach().clone().requires_grad_() for k, t in (("h", h), ("w", w), ("b", b))}
    refs = {k: t.detach().clone().requires_grad_() for k, t in (("h", h), ("w", w), ("b", b))}
    single = None
    for k in (1, 2, 3):
        chunked_lm_head_loss(leaves["h"], leaves["w"], y, bias=leaves["b"], num_chunks=4).backward()
        reference_loss(refs["h"], refs["w"], y, bias=refs["b"]).backward()
        if single is None:
            single = {name: t.grad.clone() for name, t in leaves.items()}
        for name in leaves:
            assert_exact(leaves[name].grad, refs[name].grad, f"step {k} grad of {name}")
            assert_exact(leaves[name].grad, k * single[name], f"step {k} grad of {name} vs {k}x")


@pytest.mark.parametrize("options", [{"num_chunks": 7}, {"num_chunks": 7, "weight_grad_block_rows": 30}],
                         ids=["default", "blocked_dW"])
def test_tied_weight_gradients_add_up(options):
    """With tied embeddings the same W feeds the embedding lookup and the LM head: autograd must sum both."""
    ids = torch.randint(0, V, (B, S))
    y = torch.roll(ids, -1, dims=1)
    y[:, -1] = -100
    grads = []
    for fn in (chunked_lm_head_loss, reference_loss):
        w = (torch.randn(V, D, generator=torch.Generator().manual_seed(5)) * 0.3).requires_grad_()
        h = torch.tanh(F.embedding(ids, w) * 2.0)
        fn(h, w, y, **(options if fn is chunked_lm_head_loss else {})).backward()
        grads.append(w.grad)
    assert_exact(grads[0], grads[1], "tied weight grad")


def test_frozen_weight_gets_no_gradient():
    """LoRA-style frozen head: only the hidden states get a gradient (the official unsloth port still wrote
    a V x d .grad, docs/paper.md §5.2 item 8)."""
    h, w, b, y = make_inputs()
    w.requires_grad_(False)
    chunked_lm_head_loss(h, w, y, num_chunks=3).backward()
    assert w.grad is None and h.grad is not None


def test_chunk_size_rules():
    assert lm_head_chunk_tokens(74, V, D) == math.ceil(74 / math.ceil(V / D))
    assert lm_head_chunk_tokens(74, V, D, chunk_tokens=5) == 5
    assert lm_head_chunk_tokens(74, V, D, num_chunks=2) == 37
    assert lm_head_chunk_tokens(74, V, D, logits_budget_bytes=9 * V * 4 + 3) == 9


@pytest.mark.parametrize("kwargs,match", [
    ({"reduction": "avg"}, "reduction"),
    ({"chunk_tokens": 0}, "positive"),
    ({"num_chunks": -1}, "positive"),
    ({"logits_budget_bytes": V * 4 - 1}, "below one token"),
    ({"chunk_tokens": 4, "num_chunks": 2}, "at most one"),
])
def test_bad_arguments_raise(kwargs, match):
    h, w, _, y = make_inputs()
    with pytest.raises(ValueError, match=match):
        chunked_lm_head_loss(h, w, y, **kwargs)


def test_misaligned_labels_raise():
    h, w, _, y = make_inputs()
    with pytest.raises(ValueError, match="do not align"):
        chunked_lm_head_loss(h, w, y[:, :-1])


@pytest.mark.parametrize("reduction,logits_per_chunk", [("mean", 1), ("sum", 1), ("none", 2)])
def test_logits_matmul_runs_once_for_summed_losses(monkeypatch, reduction, logits_per_chunk):
    """Summed / mean losses form their gradients in forward: one logits matmul per chunk, as vanilla's one.
    Per-token losses (upstream gradient per token) recompute the logits in backward."""
    op = importlib.import_module("mst.ops.chunked_lm_head_loss")  # the module; mst.ops re-exports the function
    calls = []
    original = op._chunk_logits
    monkeypatch.setattr(op, "_chunk_logits", lambda *a: calls.append(1) or original(*a))
    h, w, b, y = make_inputs()
    assert_matches_reference(h, w, b, y, {"num_chunks": 7}, reduction=reduction)
    assert len(calls) == 7 * logits_per_chunk  # the reference does not call it
    calls.clear()
    with torch.no_grad():  # no graph: the loss alone
        chunked_lm_head_loss(h, w, y, num_chunks=7, reduction=reduction)
    assert len(calls) == 7


@pytest.mark.parametrize("upstream", [0.37, 0.25, 3.0])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_upstream_scalar_scales_the_gradients(upstream, softcap):
    """Gradients formed in forward are multiplied by the upstream scalar in backward (loss / accumulation steps,
    loss-scaled fp16, a weighted sum of losses): still the reference gradients."""
    h, w, b, y = make_inputs(bias=True, ignore_prefix=4)
    got, ref = [], []
    for fn, out in ((chunked_lm_head_loss, got), (reference_loss, ref)):
        leaves = [t.detach().clone().requires_grad_() for t in (h, w, b)]
        kwargs = {"num_chunks": 5} if fn is chunked_lm_head_loss else {}
        (fn(leaves[0], leaves[1], y, bias=leaves[2], final_logit_softcapping=softcap, **kwargs) * upstream).backward()
        out.extend(t.grad for t in leaves)
    for name, g, r in zip(("hidden", "weight", "bias"), got, ref):
        assert_exact(g, r, f"grad of {name}")


def test_second_backward_raises_clearly():
    h, w, _, y = make_inputs()
    loss = chunked_lm_head_loss(h, w, y, num_chunks=3)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_gradients_are_not_saved_tensors():
    """The forward's gradient buffers are ctx attributes, not saved tensors: saved-tensor hooks (checkpoint
    offload to the host) never pack them, and the loss saves nothing at all."""
    h, w, _, y = make_inputs()
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t.shape) or t, lambda t: t):
        loss = chunked_lm_head_loss(h, w, y, num_chunks=3)
    assert packed == []
    loss.backward()
    assert h.grad is not None and w.grad is not None


@pytest.mark.parametrize("block_rows", [1, 10, V, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("extras", [{}, {"final_logit_softcapping": 2.0, "logit_scale": 0.7}],
                         ids=["plain", "softcap_scale"])
def test_weight_grad_by_vocab_blocks_matches_reference(block_rows, reduction, extras):
    """dW made in backward, block by block of vocabulary rows (1 row, a remainder block, all V, more than V),
    from the forward's log-sum-exp: still the reference gradients, with bias, ignored tokens and a remainder chunk."""
    h, w, b, y = make_inputs(bias=True, ignore_prefix=9)
    assert_matches_reference(h, w, b, y, {"chunk_tokens": 16, "weight_grad_block_rows": block_rows},
                             reduction=reduction, **extras)


def test_weight_grad_by_vocab_blocks_all_ignored_is_zero_like_hf():
    h, w, b, y = make_inputs()
    y[:] = -100
    for reduction in ("sum", "mean"):  # mean: NaN loss (0 / 0), zero gradients, as HF
        assert_matches_reference(h, w, b, y, {"num_chunks": 3, "weight_grad_block_rows": 30}, reduction=reduction)


@pytest.mark.parametrize("upstream", [0.37, 3.0])
def test_weight_grad_by_vocab_blocks_scales_with_upstream(upstream):
    h, w, b, y = make_inputs(bias=True, ignore_prefix=4)
    got, ref = [], []
    for kwargs, out in (({"num_chunks": 5, "weight_grad_block_rows": 20}, got), ({"num_chunks": 1}, ref)):
        leaves = [t.detach().clone().requires_grad_() for t in (h, w, b)]
        (chunked_lm_head_loss(leaves[0], leaves[1], y, bias=leaves[2], **kwargs) * upstream).backward()
        out.extend(t.grad for t in leaves)
    for name, g, r in zip(("hidden", "weight", "bias"), got, ref):
        assert_exact(g, r, f"grad of {name}")


def test_weight_grad_by_vocab_blocks_recomputes_the_logits_once(monkeypatch):
    """Forward: 7 chunks of 11 tokens (the last 8) x all V rows. Backward: each block of 20 vocabulary rows over
    chunks of V // (2 x 20) = 2 times as many tokens: every logit is recomputed exactly once."""
    op = importlib.import_module("mst.ops.chunked_lm_head_loss")
    calls = []
    original = op._chunk_logits
    monkeypatch.setattr(op, "_chunk_logits",
                        lambda h, w, *a: calls.append((h.shape[0], w.shape[0])) or original(h, w, *a))
    h, w, b, y = make_inputs()
    assert_matches_reference(h, w, b, y, {"num_chunks": 7, "weight_grad_block_rows": 20})
    forward = [(11, V)] * 6 + [(8, V)]
    backward = [(n, rows) for rows in (20, 20, 20, 20, 17) for n in (22, 22, 22, 8)]
    assert calls == forward + backward


def test_weight_grad_by_vocab_blocks_has_no_v_by_d_fp32_buffer():
    """bf16 weight: the default keeps a V x d fp32 dW accumulator from forward to backward; by blocks the largest
    fp32 buffer is a chunk's logits, a block's accumulator or a backward chunk's hidden states."""
    n, v, d, chunk, block = 64, 512, 96, 8, 32
    h = torch.randn(n, d, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, d) * 0.3).bfloat16().requires_grad_()
    y = torch.randint(0, v, (n,))
    largest = {}
    for block_rows in (None, block):
        with MaxNumelMode(dtype=torch.float32) as probe:
            chunked_lm_head_loss(h, w, y, chunk_tokens=chunk, weight_grad_block_rows=block_rows).backward()
        largest[block_rows] = probe.max_numel
    assert largest[None] == v * d
    assert largest[block] <= max(chunk * v, block * d, n * d) < v * d // 4


@pytest.mark.parametrize("kwargs,match", [({"weight_grad_block_rows": 0}, "positive"),
                                          ({"weight_grad_block_rows": 4, "reduction": "none"}, "summed")])
def test_weight_grad_by_vocab_blocks_bad_arguments(kwargs, match):
    h, w, _, y = make_inputs()
    with pytest.raises(ValueError, match=match):
        chunked_lm_head_loss(h, w, y, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's bf16 GEMM with fp32 output")
def test_cuda_fp32_output_gemm_accumulates_like_the_upcast():
    """On CUDA the fp32 dW accumulation uses a bf16 GEMM writing fp32; it must equal the upcast fp32 GEMM."""
    op = importlib.import_module("mst.ops.chunked_lm_head_loss")
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(256, 512, device="cuda", generator=gen).bfloat16()
    b = torch.randn(512, 128, device="cuda", generator=gen).bfloat16()
    acc = torch.randn(256, 128, device="cuda", generator=gen)
    want = acc.double() + a.double() @ b.double()
    op._addmm_wide(acc, a, b)
    torch.testing.assert_close(acc.double(), want, rtol=1e-5, atol=1e-4)
