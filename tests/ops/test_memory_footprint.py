"""Memory claims of the two ops, as tests that fail if the saving is lost:

- the mini-sequence MLP keeps only its input for backward (the official plain loop, mode="naive", and the plain
  module keep every S x I intermediate; docs/paper.md §5.2 item 5);
- the chunked LM-head loss never allocates a tensor with N x V elements, in forward or backward.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mst.ops import chunked_lm_head_loss, mini_sequence_mlp
from tests.utils import GatedMLP, MaxNumelMode, saved_tensor_bytes

N_MLP, D, I = 256, 16, 40  # tokens through the MLP, hidden, intermediate


def mlp_saved(mode: str | None, chunk: int = 32):
    """(bytes saved for backward excluding weights, largest saved numel, input bytes) of one MLP call."""
    mlp = GatedMLP(D, I, "silu", bias=True)
    x = torch.randn(2, N_MLP // 2, D, requires_grad=True)
    params = list(mlp.parameters())
    fn = (lambda: mlp(x)) if mode is None else (lambda: mini_sequence_mlp(x, mlp.forward, params, chunk, mode))
    out, saved, largest = saved_tensor_bytes(fn, exclude=params)
    out.sum().backward()  # the graph built under the hooks is still valid
    return saved, largest, x.numel() * x.element_size()


@pytest.mark.parametrize("chunk", [8, 32, 100])
def test_mst_mlp_saves_only_its_input(chunk):
    saved, largest, x_bytes = mlp_saved("recompute", chunk)
    assert saved == x_bytes
    assert largest < N_MLP * I  # nothing S x I is kept


def test_naive_and_plain_mlp_save_the_intermediates():
    plain, plain_largest, x_bytes = mlp_saved(None)
    naive, _, _ = mlp_saved("naive", 32)
    s_by_i = N_MLP * I * 4
    # gate output, act(gate), up output and their product: at least 3 full S x I fp32 tensors beyond x
    assert plain - x_bytes >= 3 * s_by_i and plain_largest == N_MLP * I
    # the plain loop under autograd saves every chunk's intermediates: as much as the unchunked MLP
    assert naive - x_bytes >= 3 * s_by_i
    assert abs(naive - plain) <= 0.01 * plain
    recompute, _, _ = mlp_saved("recompute", 32)
    assert recompute * 4 < naive


def lm_head_max_numel(fn, n_tokens: int, vocab: int, hidden: int) -> int:
    h = torch.randn(n_tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * 0.3).requires_grad_()
    y = torch.randint(0, vocab, (n_tokens,))
    with MaxNumelMode() as probe:
        fn(h, w, y).backward()
    return probe.max_numel


@pytest.mark.parametrize("chunk", [16, 64])
def test_lm_head_never_allocates_n_by_v(chunk):
    n, v, d = 2048, 257, 16
    got = lm_head_max_numel(lambda h, w, y: chunked_lm_head_loss(h, w, y, chunk_tokens=chunk), n, v, d)
    assert got <= max(chunk * v, n * d, v * d)  # one chunk's logits, the hidden states or the weight
    assert got < n * v // 8


def test_probe_sees_the_reference_logits():
    """The probe is sensitive: the unchunked reference does allocate N x V."""
    n, v, d = 2048, 257, 16
    assert lm_head_max_numel(lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y), n, v, d) >= n * v
