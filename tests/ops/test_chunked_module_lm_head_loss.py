"""chunked_module_lm_head_loss against ``F.cross_entropy(head(h).float(), y)`` through the head *module*: loss and
the gradients of the hidden states and of every head parameter (weight, bias, a LoRA-like adapter's) must equal the
reference (fp32, ``tests.utils.assert_exact``), for plain, hooked and adapter heads, every reduction, odd lengths,
ignored labels, softcapping / scaling and tied embeddings; with dropout in the head, the gradient must be that of the
returned loss (the recompute replays each chunk's forward RNG state)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mst.ops import ChunkedModuleLMHeadLossFunction, chunked_lm_head_loss, chunked_module_lm_head_loss
from tests.utils import MaxNumelMode, assert_exact, saved_tensor_bytes

B, S, D, V, R = 2, 37, 16, 97, 4  # B*S = 74 tokens; default M = ceil(97 / 16) = 7 chunks of 11 (remainder 8)


class LoRAHead(nn.Module):
    """A PEFT-style LoRA lm_head: frozen base Linear + B(A(dropout(x))) * scaling (B random, not zero, so the
    adapter changes the loss)."""

    def __init__(self, p: float = 0.3, bias: bool = True):
        super().__init__()
        self.base = nn.Linear(D, V, bias=bias).requires_grad_(False)
        self.lora_a = nn.Linear(D, R, bias=False)
        self.lora_b = nn.Linear(R, V, bias=False)
        nn.init.normal_(self.lora_b.weight, std=0.5)
        self.drop = nn.Dropout(p)
        self.scaling = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(self.drop(x))) * self.scaling


def linear_head(bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(D, V, bias=bias)


def lora_head(p: float = 0.3) -> LoRAHead:
    torch.manual_seed(0)
    return LoRAHead(p).train()


def trainable(head: nn.Module) -> list[torch.Tensor]:
    return [p for p in head.parameters() if p.requires_grad]


def reference_loss(h, head, y, *, reduction="mean", num_items_in_batch=None, logit_scale=None,
                   final_logit_softcapping=None, ignore_index=-100):
    """The unchunked computation HF performs: fp32 logits of the head module, optional scale / softcap, then
    cross-entropy."""
    z = head(h).float()
    if logit_scale is not None:
        z = z * logit_scale
    if final_logit_softcapping is not None:
        z = torch.tanh(z / final_logit_softcapping) * final_logit_softcapping
    red = "sum" if num_items_in_batch is not None else reduction
    loss = F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=ignore_index, reduction=red)
    if num_items_in_batch is not None:
        return loss / num_items_in_batch
    return loss.view(y.shape) if reduction == "none" else loss


def chunked_loss(h, head, y, **kwargs):
    return chunked_module_lm_head_loss(h, head, trainable(head), y, vocab_size=V, **kwargs)


def naive_loop_loss(h, head, y, *, chunk_tokens, ignore_index=-100):
    """The plain chunk loop under autograd (mean over valid labels), skipping chunks without a valid label as the op
    does: from the same seed it draws the same dropout masks as the op's forward."""
    flat_h, flat_y = h.reshape(-1, D), y.reshape(-1)
    total = 0.0
    for s in range(0, flat_y.shape[0], chunk_tokens):
        ys = flat_y[s:s + chunk_tokens]
        if (ys != ignore_index).any():
            total = total + reference_loss(flat_h[s:s + chunk_tokens], head, ys, reduction="sum",
                                           ignore_index=ignore_index)
    return total / (flat_y != ignore_index).sum()


def make_inputs(shape=(B, S), ignore_prefix=0, dtype=torch.float32):
    h = torch.randn(*shape, D, dtype=dtype)
    y = torch.randint(0, V, shape)
    if ignore_prefix:
        y[..., :ignore_prefix] = -100
    return h, y


def loss_and_grads(fn, h, head, y, seed=None, **kwargs):
    """(loss, grad of h, {param name: grad}) of one forward+backward on a fresh leaf copy of h, from ``seed`` if
    given; reduction="none" is backpropagated with a random upstream gradient so per-token weights are tested."""
    head.zero_grad(set_to_none=True)
    h = h.detach().clone().requires_grad_()
    if seed is not None:
        torch.manual_seed(seed)
    loss = fn(h, head, y, **kwargs)
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(3)) if loss.dim() else None
    if torch.isfinite(loss).all():
        loss.backward(upstream)
    return loss.detach(), h.grad, {n: p.grad for n, p in head.named_parameters()}


def assert_same(got, ref):
    assert_exact(got[0], ref[0], "loss")
    assert_exact(got[1], ref[1], "grad of hidden")
    assert got[2].keys() == ref[2].keys()
    for name, r in ref[2].items():
        if r is None:
            assert got[2][name] is None, f"{name} is frozen but got a gradient"
        else:
            assert_exact(got[2][name], r, f"grad of {name}")


def assert_matches_reference(h, head, y, chunking=None, **kwargs):
    got = loss_and_grads(chunked_loss, h, head, y, **(chunking or {}), **kwargs)
    assert_same(got, loss_and_grads(reference_loss, h, head, y, **kwargs))
    return got


CHUNKINGS = {"auto": {}, "M1": {"num_chunks": 1}, "M7": {"num_chunks": 7}, "C5": {"chunk_tokens": 5},
             "budget": {"logits_budget_bytes": 9 * V * 4 + 3}}


@pytest.mark.parametrize("chunking", list(CHUNKINGS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_prefix", [0, 9], ids=["all_valid", "ignored_prefix"])
def test_linear_head_matches_reference(chunking, reduction, ignore_prefix):
    h, y = make_inputs(ignore_prefix=ignore_prefix)
    loss, _, grads = assert_matches_reference(h, linear_head(), y, CHUNKINGS[chunking], reduction=reduction)
    assert grads["weight"] is not None and grads["bias"] is not None
    if reduction == "none":
        assert loss.shape == y.shape and (loss[y == -100] == 0).all()


@pytest.mark.parametrize("seq", [1, 7, 125])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("chunk", [2, 6, 16])  # none divides 7 or 125 (nor 250)
def test_odd_lengths(seq, batch, chunk):
    h, y = make_inputs(shape=(batch, seq))
    assert_matches_reference(h, linear_head(), y, {"chunk_tokens": chunk})


def test_same_loss_as_the_weight_op_for_a_plain_head():
    """A plain Linear head gives chunked_lm_head_loss's loss and gradients."""
    h, y = make_inputs(ignore_prefix=4)
    head = linear_head()
    got = loss_and_grads(chunked_loss, h, head, y, num_chunks=5)
    ref = loss_and_grads(lambda hh, m, yy, **kw: chunked_lm_head_loss(hh, m.weight, yy, bias=m.bias, **kw),
                         h, head, y, num_chunks=5)
    assert_same(got, ref)


def test_forward_hook_runs_and_counts():
    """A forward hook that scales the head's output is part of the loss (the weight op would ignore it)."""
    head = linear_head()
    calls = []
    head.register_forward_hook(lambda m, args, out: calls.append(out.shape[0]) or out * 0.5)
    h, y = make_inputs(ignore_prefix=3)
    loss, _, _ = assert_matches_reference(h, head, y, {"chunk_tokens": 10})
    weight_op = chunked_lm_head_loss(h, head.weight, y, bias=head.bias, chunk_tokens=10)
    assert not torch.allclose(loss, weight_op), "the hook must change the loss"
    calls.clear()
    chunked_loss(h.requires_grad_(), head, y, chunk_tokens=10).backward()
    assert calls == [10] * 7 + [4] + [10] * 7 + [4]  # 74 tokens: 8 chunks in forward, 8 recomputes in backward


def test_lora_head_without_dropout_matches_reference():
    """An adapter head (dropout off): the adapter gets the reference gradient, the frozen base none."""
    head = lora_head().eval()
    h, y = make_inputs(ignore_prefix=5)
    _, _, grads = assert_matches_reference(h, head, y, {"chunk_tokens": 9})
    assert grads["base.weight"] is None and grads["lora_a.weight"] is not None


@pytest.mark.parametrize("chunk", [5, 11, 74])  # 74 tokens: 15 chunks, 7 chunks, one chunk
@pytest.mark.parametrize("ignore_prefix", [0, 12], ids=["all_valid", "ignored_prefix"])
def test_lora_dropout_replays_the_forward_masks(chunk, ignore_prefix):
    """Dropout (p=0.3, train mode) in the adapter: from the same seed, loss and every gradient equal those of the
    plain chunk loop under autograd (the same masks), and the caller's RNG stream afterwards is the loop's: the
    backward's recompute replays each chunk's masks inside a fork."""
    head = lora_head()
    h, y = make_inputs(ignore_prefix=ignore_prefix)
    got = loss_and_grads(chunked_loss, h, head, y, seed=21, chunk_tokens=chunk)
    got_state = torch.get_rng_state()
    ref = loss_and_grads(naive_loop_loss, h, head, y, seed=21, chunk_tokens=chunk)
    assert torch.equal(got_state, torch.get_rng_state()), "the recompute moved the caller's RNG stream"
    assert_same(got, ref)
    other = loss_and_grads(naive_loop_loss, h, head, y, seed=22, chunk_tokens=chunk)
    assert not torch.equal(other[2]["lora_a.weight"], ref[2]["lora_a.weight"]), "dropout is not random"


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_lora_dropout_gradient_is_the_derivative_of_the_loss(reduction):
    """float64: the directional derivative of the returned loss along a random direction of (h, every head
    parameter) equals a central finite difference of that loss (evaluated from the same seed: the same masks)."""
    head = lora_head().double()
    head.base.requires_grad_(True)
    params = trainable(head)
    h, y = make_inputs(shape=(3, 9), ignore_prefix=2, dtype=torch.float64)
    h.requires_grad_()

    def loss(seed: int = 8) -> torch.Tensor:
        torch.manual_seed(seed)
        return chunked_module_lm_head_loss(h, head, params, y, chunk_tokens=4, reduction=reduction,
                                           final_logit_softcapping=3.0)

    out = loss()
    assert out.dtype == torch.float64
    out.backward()
    gen = torch.Generator().manual_seed(2)
    leaves = [h, *params]
    dirs = [torch.randn(t.shape, dtype=t.dtype, generator=gen) for t in leaves]
    analytic = sum(float((t.grad * v).sum()) for t, v in zip(leaves, dirs))
    eps = 1e-6
    values = []
    with torch.no_grad():
        for sign in (1.0, -2.0, 1.0):  # +eps, then -eps, then back
            for t, v in zip(leaves, dirs):
                t.add_(sign * eps * v)
            values.append(float(loss()))
    numeric = (values[0] - values[1]) / (2 * eps)
    assert math.isclose(analytic, numeric, rel_tol=1e-6), (analytic, numeric)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_is_hf_behaviour(reduction):
    """As chunked_lm_head_loss (and HF): every label ignored gives a NaN mean loss (0 for sum / none) and zero
    gradients for the hidden states and every trainable head parameter; head_fn is never called."""
    head = lora_head().eval()
    calls = []
    head.register_forward_hook(lambda *a: calls.append(1))
    h, y = make_inputs()
    y.fill_(-100)
    results = []
    for fn, kwargs in ((chunked_loss, {"num_chunks": 3}), (reference_loss, {})):
        head.zero_grad(set_to_none=True)
        leaf = h.detach().clone().requires_grad_()
        loss = fn(leaf, head, y, reduction=reduction, **kwargs)
        loss.sum().backward()  # HF's loss backpropagates zeros even when it is NaN
        results.append((loss.detach(), leaf.grad, {n: p.grad for n, p in head.named_parameters()}))
        if fn is chunked_loss:
            assert calls == []
    got = results[0]
    assert_same(got, results[1])
    if reduction == "mean":
        assert torch.isnan(got[0])
    else:
        assert (got[0] == 0).all()
    assert (got[1] == 0).all() and (got[2]["lora_b.weight"] == 0).all()


def test_chunks_without_labels_are_skipped():
    """Chunks whose labels are all ignored (an SFT prompt) never run the head."""
    head = linear_head()
    calls = []
    head.register_forward_hook(lambda m, args, out: calls.append(out.shape[0]))
    h, y = make_inputs(shape=(1, 40))
    y[0, :25] = -100  # chunks of 10: the first two are fully ignored, the third partly
    assert_matches_reference(h, head, y, {"chunk_tokens": 10})
    calls.clear()
    chunked_loss(h.requires_grad_(), head, y, chunk_tokens=10).backward()
    assert calls == [10, 10, 10, 10]  # chunks 3 and 4, in forward and in backward


@pytest.mark.parametrize("ignore_index", [-1, 3])
def test_custom_ignore_index(ignore_index):
    h, y = make_inputs()
    y[:, :6] = ignore_index
    y[1, 20:30] = ignore_index
    assert_matches_reference(h, linear_head(), y, {"chunk_tokens": 7}, ignore_index=ignore_index)


def test_softcapping_and_logit_scale():
    h, y = make_inputs(ignore_prefix=2)
    h = h * 4  # logits of a few units, so a cap of 2 is strongly nonlinear
    head = linear_head()
    for kwargs in ({"final_logit_softcapping": 2.0}, {"logit_scale": 0.0625},
                   {"logit_scale": 3.0, "final_logit_softcapping": 1.5}):
        loss, _, _ = assert_matches_reference(h, head, y, {"chunk_tokens": 6}, **kwargs)
        assert not torch.allclose(loss, reference_loss(h, head, y)), kwargs


@pytest.mark.parametrize("as_tensor", [False, True], ids=["int", "tensor"])
def test_num_items_in_batch(as_tensor):
    """HF Trainer passes the token count of the whole accumulation window: loss = sum / num_items."""
    h, y = make_inputs(ignore_prefix=4)
    n = 3 * int((y != -100).sum())
    num_items = torch.tensor(n) if as_tensor else n
    assert_matches_reference(h, lora_head().eval(), y, {"num_chunks": 4}, num_items_in_batch=num_items)


@pytest.mark.parametrize("upstream", [0.37, 3.0])
def test_upstream_scalar_and_accumulation(upstream):
    """A scaled loss, backpropagated twice (gradient accumulation, and a retained graph): still the reference."""
    h, y = make_inputs(ignore_prefix=4)
    head = linear_head()
    results = []
    for fn, kwargs in ((chunked_loss, {"num_chunks": 5}), (reference_loss, {})):
        head.zero_grad(set_to_none=True)
        leaf = h.detach().clone().requires_grad_()
        loss = fn(leaf, head, y, **kwargs) * upstream
        loss.backward(retain_graph=True)
        loss.backward()
        results.append((loss.detach(), leaf.grad, {n: p.grad for n, p in head.named_parameters()}))
    assert_same(*results)


def test_tied_weight_gradients_add_up():
    """With tied embeddings the same W feeds the embedding lookup and the head: autograd must sum both."""
    ids = torch.randint(0, V, (B, S))
    y = torch.roll(ids, -1, dims=1)
    y[:, -1] = -100
    grads = []
    for chunked in (True, False):
        w = (torch.randn(V, D, generator=torch.Generator().manual_seed(5)) * 0.3).requires_grad_()
        h = torch.tanh(F.embedding(ids, w) * 2.0)
        head = lambda x: F.linear(x, w)  # noqa: E731
        if chunked:
            chunked_module_lm_head_loss(h, head, [w], y, num_chunks=7).backward()
        else:
            reference_loss(h, head, y).backward()
        grads.append(w.grad)
    assert_exact(grads[0], grads[1], "tied weight grad")


def test_recompute_runs_under_the_forward_autocast():
    """Backward runs outside the caller's torch.autocast: the recompute re-enters it, so it computes the logits in
    the forward's precision; the loss gradient itself is formed in fp32."""
    head = linear_head()
    seen = []

    def head_fn(x: torch.Tensor) -> torch.Tensor:
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return head(x)

    h, y = make_inputs()
    h.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_module_lm_head_loss(h, head_fn, trainable(head), y, chunk_tokens=20)
        ref = reference_loss(h, head, y)
    assert loss.dtype == torch.float32
    loss.backward()
    assert seen == [(True, torch.bfloat16)] * 8  # 4 chunks: forward and recompute
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=1e-2)
    assert head.weight.grad.dtype == torch.float32 and torch.isfinite(head.weight.grad).all()


def test_no_grad_path_builds_no_graph():
    head = lora_head()
    h, y = make_inputs()
    with torch.no_grad():
        loss = chunked_loss(h, head, y, chunk_tokens=8)
    assert loss.grad_fn is None
    head.eval()
    torch.testing.assert_close(chunked_loss(h, head, y, chunk_tokens=8), reference_loss(h, head, y))
    out = chunked_loss(h.requires_grad_(), head, y, chunk_tokens=8)
    assert type(out.grad_fn).__name__ == ChunkedModuleLMHeadLossFunction.__name__ + "Backward"


def test_saves_only_hidden_and_labels_and_never_allocates_n_by_v():
    n, chunk = 512, 16
    head = lora_head()
    h = torch.randn(n, D, requires_grad=True)
    y = torch.randint(0, V, (n,))
    with MaxNumelMode(with_dim=V) as probe:
        loss, saved, _ = saved_tensor_bytes(
            lambda: chunked_module_lm_head_loss(h, head, trainable(head), y, chunk_tokens=chunk),
            exclude=head.parameters())
        loss.backward()
    assert saved == h.numel() * h.element_size() + y.numel() * y.element_size()
    assert probe.max_numel <= max(chunk * V, V * D)  # one chunk's logits, or the weight
    assert probe.max_numel < n * V // 8


@pytest.mark.parametrize("kwargs,match", [
    ({"reduction": "avg", "chunk_tokens": 4}, "reduction"),
    ({}, "vocab_size"),
    ({"logits_budget_bytes": 4096}, "vocab_size"),
    ({"chunk_tokens": 0}, "positive"),
    ({"chunk_tokens": 4, "num_chunks": 2}, "at most one"),
])
def test_bad_arguments_raise(kwargs, match):
    head = linear_head()
    h, y = make_inputs()
    with pytest.raises(ValueError, match=match):
        chunked_module_lm_head_loss(h, head, trainable(head), y, **kwargs)
    with pytest.raises(ValueError, match="do not align"):
        chunked_module_lm_head_loss(h, head, trainable(head), y[:, :-1], chunk_tokens=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA generator's replay")
def test_lora_dropout_replay_on_cuda():
    head = lora_head().cuda()
    h, y = make_inputs(ignore_prefix=6)
    h, y = h.cuda(), y.cuda()
    results = []
    for fn in (chunked_loss, naive_loop_loss):
        head.zero_grad(set_to_none=True)
        leaf = h.clone().requires_grad_()
        torch.manual_seed(9)
        loss = fn(leaf, head, y, chunk_tokens=10)
        loss.backward()
        results.append(((loss.detach(), leaf.grad, {n: p.grad for n, p in head.named_parameters()}),
                        torch.cuda.get_rng_state()))
    assert_same(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
