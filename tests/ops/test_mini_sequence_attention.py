"""``mst.ops.mini_sequence_attention``: exact attention by query chunks, against a plain PyTorch reference.

The reference is HF's eager attention written out (repeated K/V, fp32 softmax, boolean / additive masks, causal
aligned lower right, window as HF's sliding mask: key j is seen from position p when p - window < j <= p, softcap);
a query row that sees no key gives zeros, as SDPA. Both backends of the op are checked on CPU; what the op keeps for
backward (Q, K, V, nothing S x S) and its largest tensor are checked too.
"""
from __future__ import annotations

import pytest
import torch

from mst.ops import default_attention_chunk_tokens, mini_sequence_attention
from mst.ops.lm_head_common import MAX_CHUNK_ELEMENTS
from tests.utils import MaxNumelMode, assert_exact, rel_err, saved_tensor_bytes


def reference(q, k, v, mask=None, scale=None, causal=True, window=None, softcap=None):
    b, h, s, d = q.shape
    n_keys, groups = k.shape[2], h // k.shape[1]
    kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ kk.transpose(-1, -2)).to(torch.promote_types(q.dtype, torch.float32)) * (scale or d ** -0.5)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = torch.arange(n_keys - s, n_keys)[:, None]
    k_pos = torch.arange(n_keys)[None]
    keep = torch.ones(s, n_keys, dtype=torch.bool)
    if causal:
        keep &= k_pos <= q_pos
    if window:
        keep &= k_pos > q_pos - window
    keep = keep.expand(b, h, s, n_keys)
    if mask is not None:
        if mask.dtype == torch.bool:
            keep = keep & mask
        else:
            scores = scores + mask
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1)
    probs = probs.masked_fill(~keep.any(-1, keepdim=True), 0)
    return probs.to(v.dtype) @ vv


def inputs(batch=2, heads=4, kv_heads=2, seq=7, keys=None, dim=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = keys or seq
    q = torch.randn(batch, heads, seq, dim, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(batch, kv_heads, keys, dim, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(batch, kv_heads, keys, dim, generator=g, dtype=dtype).requires_grad_()
    return q, k, v


def assert_matches_reference(q, k, v, *, chunk_tokens, backend="math", **options):
    mask = options.get("mask")
    out = mini_sequence_attention(q, k, v, chunk_tokens=chunk_tokens, backend=backend, **options)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = reference(q, k, v, **options)
    expected = torch.autograd.grad(ref, (q, k, v), grad)
    assert_exact(out.detach(), ref.detach(), "output")
    for name, a, e in zip("qkv", got, expected):
        if e.any():
            assert_exact(a, e, f"d{name}")
        else:  # one key per query (S = 1): dQ is 0 and the op's is rounding noise, so no relative error exists
            torch.testing.assert_close(a, e)
    assert mask is None or not mask.requires_grad


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("seq,chunk", [(1, 4), (7, 3), (125, 16), (125, 1), (35, 200)])
def test_causal_matches_reference(backend, kv_heads, seq, chunk):
    assert_matches_reference(*inputs(kv_heads=kv_heads, seq=seq), chunk_tokens=chunk, backend=backend)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
@pytest.mark.parametrize("options", [
    dict(window=48), dict(window=1), dict(causal=False), dict(scale=0.3), dict(window=5, causal=False)],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_options_match_reference(backend, options):
    assert_matches_reference(*inputs(seq=125), chunk_tokens=16, backend=backend, **options)


@pytest.mark.parametrize("window", [None, 48])
def test_softcap_matches_reference(window):
    assert_matches_reference(*inputs(seq=125), chunk_tokens=16, softcap=1.0, window=window)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_queries_after_a_cache_align_lower_right(backend):
    """Decoding with a cache: the S queries are the last S of the Sk key positions."""
    assert_matches_reference(*inputs(seq=5, keys=23), chunk_tokens=2, backend=backend)
    assert_matches_reference(*inputs(seq=1, keys=23), chunk_tokens=2, backend=backend)


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_boolean_padding_mask_with_rows_that_see_nothing(backend):
    q, k, v = inputs(seq=20)
    valid = torch.ones(2, 20, dtype=torch.bool)
    valid[1, :5] = False  # left padding: row 1's first five queries see no key at all
    causal = torch.ones(20, 20, dtype=torch.bool).tril()
    mask = valid[:, None, None, :] & causal
    assert_matches_reference(q, k, v, chunk_tokens=6, backend=backend, mask=mask, causal=False)
    out = mini_sequence_attention(q, k, v, mask=mask, causal=False, chunk_tokens=6, backend=backend)
    assert out[1, :, :5].abs().max() == 0


def test_additive_mask_per_head():
    q, k, v = inputs(seq=33)
    bias = torch.randn(2, 4, 33, 33, generator=torch.Generator().manual_seed(3))
    assert_matches_reference(q, k, v, chunk_tokens=8, mask=bias)


def test_float64_is_kept_in_float64():
    assert_matches_reference(*inputs(seq=50, dtype=torch.float64), chunk_tokens=7)


def test_bf16_no_worse_than_unchunked_bf16():
    q32, k32, v32 = inputs(seq=125)
    ref = reference(q32, k32, v32)
    grad = torch.randn_like(ref)
    exact = torch.autograd.grad(ref, (q32, k32, v32), grad)
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in (q32, k32, v32))
    errors = {}
    for name, fn in (("vanilla", lambda: reference(q, k, v)),
                     ("mst", lambda: mini_sequence_attention(q, k, v, chunk_tokens=16))):
        out = fn()
        grads = torch.autograd.grad(out, (q, k, v), grad.bfloat16())
        errors[name] = [rel_err(out.detach().float(), ref.detach())] + [rel_err(g.float(), e)
                                                                          for g, e in zip(grads, exact)]
    for mine, vanilla in zip(errors["mst"], errors["vanilla"]):
        assert mine <= 1.05 * vanilla + 1e-3, errors


def test_keeps_only_q_k_v_and_never_an_s_by_s_tensor():
    q, k, v = inputs(batch=1, heads=4, kv_heads=1, seq=256)
    qkv_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))
    with MaxNumelMode() as largest:
        out, saved, _ = saved_tensor_bytes(lambda: mini_sequence_attention(q, k, v, chunk_tokens=16))
        out.sum().backward()
    assert saved == qkv_bytes
    assert largest.max_numel <= 4 * 16 * 256, largest.max_op  # one chunk's scores: heads x chunk x keys
    assert k.grad.dtype == k.dtype and k.grad.shape == k.shape  # summed at the KV heads' width, no repeat


def test_autocast_recompute_matches_the_forward():
    q, k, v = inputs(seq=40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mini_sequence_attention(q, k, v, chunk_tokens=8)
        ref = reference(q, k, v)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    expected = torch.autograd.grad(ref, (q, k, v), grad)
    for a, e in zip(got, expected):
        assert rel_err(a, e) < 2e-2


def test_default_chunks_keep_every_tensor_query_sized_and_int32_indexable():
    """Large-index safety: at Llama3-8B's 32 heads of width 128, S = 1M keys make a full score matrix 2^45
    elements. The default math chunk keeps one chunk's fp32 scores at most Q's size at the key length, the CPU SDPA
    chunk its C x L boolean mask likewise, both below 2^31 (where int32-indexed kernels fail), >= 1 query each."""
    for batch, heads, keys in [(1, 32, 2 ** 20), (1, 32, 524_288), (2, 8, 4096), (1, 4, 7), (1, 32, 2 ** 26)]:
        chunk = default_attention_chunk_tokens(batch, heads, 128, keys, "math", cuda=False)
        assert 1 <= chunk <= 128
        assert batch * heads * chunk * keys <= min(batch * heads * 128 * keys, MAX_CHUNK_ELEMENTS) or chunk == 1
        chunk = default_attention_chunk_tokens(batch, heads, 128, keys, "sdpa", cuda=False)
        assert 1 <= chunk <= heads * 128 and chunk * keys <= MAX_CHUNK_ELEMENTS
    assert default_attention_chunk_tokens(1, 32, 128, 2 ** 20, "math", cuda=False) == 63
    assert default_attention_chunk_tokens(1, 32, 128, 2 ** 20, "sdpa", cuda=True) == 8192


def test_traced_as_cuda_plans_the_flash_kernel_without_a_mask():
    """The memory planner's trace of a CUDA run (fake tensors): no C x L mask, the CUDA default chunk."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mst.ops.mini_sequence_attention import traced_as_cuda
    with FakeTensorMode():
        q, k, v = inputs(batch=1, heads=4, kv_heads=2, seq=16384, dim=8)
        with traced_as_cuda(), MaxNumelMode() as cuda_like:
            mini_sequence_attention(q, k, v).sum().backward()
        with MaxNumelMode() as cpu:
            mini_sequence_attention(q, k, v).sum().backward()
    assert cuda_like.max_numel == q.numel()  # nothing larger than Q: no mask, no scores
    assert cpu.max_numel == 4 * 8 * 16384  # the CPU chunk's (H x D) x Sk boolean mask


def test_empty_and_single_token():
    q, k, v = inputs(seq=0, keys=3)
    assert mini_sequence_attention(q, k, v).shape == (2, 4, 0, 8)
    assert_matches_reference(*inputs(seq=1), chunk_tokens=1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(backend="flash"), "backend"),
    (dict(chunk_tokens=0), "chunk_tokens"),
    (dict(window=0), "window"),
    (dict(softcap=0.0), "softcap"),
    (dict(softcap=1.0, backend="sdpa"), "softcap"),
    (dict(mask=torch.ones(2, 4, 7, 6, dtype=torch.bool)), "mask"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mini_sequence_attention(*inputs(), **kwargs)


def test_bad_shapes_raise():
    q, k, v = inputs(heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="group"):
        mini_sequence_attention(q, k[:, :3], v[:, :3])
    q, k, v = inputs(seq=9, keys=5)
    with pytest.raises(ValueError, match="fewer keys"):
        mini_sequence_attention(q, k, v)
    with pytest.raises(ValueError, match="expected"):
        mini_sequence_attention(q[0], k, v)
