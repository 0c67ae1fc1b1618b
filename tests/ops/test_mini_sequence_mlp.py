"""mini_sequence_mlp against the plain module: outputs, input gradient and every weight gradient must equal the
unchunked MLP's (fp32, ``tests.utils.assert_exact``), for SwiGLU and GeGLU, with/without biases, chunk sizes that do and
do not divide N, 2-D and 3-D inputs, frozen weights, both modes, and the no-grad path; with dropout inside the MLP,
the recompute must replay the forward's masks."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mst.ops import MiniSequenceMLPFunction, mini_sequence_mlp, resolve_chunk_tokens
from tests.utils import GATED_ACTS, GatedMLP, assert_exact

D, I = 16, 40


def make_mlp(act: str = "silu", bias: bool = False) -> GatedMLP:
    return GatedMLP(D, I, act, bias)


def run(mlp: GatedMLP, x: torch.Tensor, chunk: int | None, mode: str = "recompute"):
    """Output, input grad and {name: grad} of one forward+backward, chunked (chunk) or plain (None)."""
    mlp.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    params = [p for p in mlp.parameters() if p.requires_grad]
    out = mlp(x) if chunk is None else mini_sequence_mlp(x, mlp.forward, params, chunk, mode=mode)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    out.backward(grad_out)
    return out.detach(), x.grad, {n: p.grad for n, p in mlp.named_parameters()}


def assert_same(got, ref) -> None:
    assert_exact(got[0], ref[0], "output")
    if ref[1] is None:
        assert got[1] is None
    else:
        assert_exact(got[1], ref[1], "grad of x")
    assert got[2].keys() == ref[2].keys()
    for name, g in ref[2].items():
        if g is None:
            assert got[2][name] is None, f"{name} is frozen but got a gradient"
        else:
            assert_exact(got[2][name], g, f"grad of {name}")


@pytest.mark.parametrize("act", sorted(GATED_ACTS))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", [(50, D), (2, 25, D)], ids=["2d", "3d"])
@pytest.mark.parametrize("chunk", [1, 7, 10, 49, 50, 64])  # 7/49 leave a remainder; 10 divides; >=50 no split
@pytest.mark.parametrize("mode", ["recompute", "naive"])
def test_matches_plain_mlp(act, bias, shape, chunk, mode):
    mlp = make_mlp(act, bias)
    x = torch.randn(shape, requires_grad=True)
    assert_same(run(mlp, x, chunk, mode), run(mlp, x, None))


@pytest.mark.parametrize("frozen,x_grad", [(("gate_proj",), True), (("gate_proj",), False),
                                            (("up_proj", "down_proj"), True), (("up_proj", "down_proj"), False),
                                            (("gate_proj", "up_proj", "down_proj"), True)])
def test_frozen_weights(frozen, x_grad):
    """LoRA-style partially frozen MLPs: frozen weights get no gradient, the others (and x) exact ones."""
    mlp = make_mlp("silu", bias=True)
    for name in frozen:
        getattr(mlp, name).requires_grad_(False)
    x = torch.randn(3, 17, D, requires_grad=x_grad)
    assert_same(run(mlp, x, 5), run(mlp, x, None))


def test_gradient_accumulates_across_backwards():
    """Two backward calls add into .grad exactly like the plain module (no manual .grad writes)."""
    mlp = make_mlp("silu")
    x = torch.randn(2, 19, D)
    grads = {}
    for chunk in (None, 4):
        mlp.zero_grad(set_to_none=True)
        for _ in range(2):
            params = list(mlp.parameters())
            out = mlp(x) if chunk is None else mini_sequence_mlp(x, mlp.forward, params, chunk)
            out.square().sum().backward()
        grads[chunk] = [p.grad.clone() for p in mlp.parameters()]
    for got, ref in zip(grads[4], grads[None]):
        assert_exact(got, ref)


def test_autograd_function_is_used_and_no_grad_path():
    """With grad enabled and N > C the custom Function runs; under no_grad the output is equal and graph-free."""
    mlp = make_mlp("gelu_pytorch_tanh", bias=True)
    x = torch.randn(40, D, requires_grad=True)
    out = mini_sequence_mlp(x, mlp.forward, list(mlp.parameters()), 8)
    assert type(out.grad_fn).__name__ == MiniSequenceMLPFunction.__name__ + "Backward"
    with torch.no_grad():
        out_ng = mini_sequence_mlp(x, mlp.forward, list(mlp.parameters()), 8)
    assert out_ng.grad_fn is None
    torch.testing.assert_close(out_ng, mlp(x).detach())


def test_empty_and_single_token():
    mlp = make_mlp("silu")
    for shape in [(1, 0, D), (1, 1, D)]:
        x = torch.randn(shape, requires_grad=True)
        out = mini_sequence_mlp(x, mlp.forward, list(mlp.parameters()), 4)
        torch.testing.assert_close(out, mlp(x))


@pytest.mark.parametrize("chunk", [0, -3])
def test_chunk_not_positive_raises(chunk):
    mlp = make_mlp("silu")
    with pytest.raises(ValueError, match="positive"):
        mini_sequence_mlp(torch.randn(4, D), mlp.forward, list(mlp.parameters()), chunk)


def test_bad_mode_raises():
    mlp = make_mlp("silu")
    with pytest.raises(ValueError, match="mode"):
        mini_sequence_mlp(torch.randn(9, D), mlp.forward, list(mlp.parameters()), 4, mode="fast")


def test_resolve_chunk_tokens():
    assert resolve_chunk_tokens(100, chunk_tokens=16) == 16
    assert resolve_chunk_tokens(100, num_chunks=8) == 13  # ceil(100 / 8)
    assert resolve_chunk_tokens(3, num_chunks=8) == 1
    assert resolve_chunk_tokens(100, default=32) == 32
    for kwargs in ({"chunk_tokens": 0}, {"num_chunks": 0}, {"chunk_tokens": -1}, {},
                   {"chunk_tokens": 4, "num_chunks": 2}):
        with pytest.raises(ValueError):
            resolve_chunk_tokens(100, **kwargs)


@pytest.mark.parametrize("post_op_saves_output", [False, True])
def test_checkpoint_recompute_skips_the_mlp(post_op_saves_output):
    """Under non-reentrant checkpointing the layer's recompute stops once X is saved again (torch's early stop), so
    the MLP runs forward twice per step (forward + MsT's per-chunk recompute), as plain checkpointing does, unless an
    op after the MLP saves its output (Gemma-2's post-MLP norm): then three times. Exact either way."""
    mlp = make_mlp()
    calls = {"n": 0}

    def counted(t: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return mlp(t)

    def layer(h: torch.Tensor, mlp_fn) -> torch.Tensor:
        y = mlp_fn(h * 2)
        return h + (y * y if post_op_saves_output else y)

    x = torch.randn(2, 50, D)
    results = []
    for chunked in (False, True):
        mlp.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        fn = (lambda h: mini_sequence_mlp(h, counted, list(mlp.parameters()), 16)) if chunked else mlp
        calls["n"] = 0
        out = torch.utils.checkpoint.checkpoint(layer, xi, fn, use_reentrant=False)
        out.sum().backward()
        results.append((out.detach(), xi.grad, {n: p.grad for n, p in mlp.named_parameters()}))
    assert calls["n"] == 7 * (3 if post_op_saves_output else 2)  # 100 tokens = 7 chunks of 16
    assert_same(results[1], results[0])


class DropoutMLP(GatedMLP):
    """A gated MLP with dropout on its intermediate (as nn.Dropout in an MLP, or a LoRA adapter's lora_dropout)."""

    def __init__(self, p: float = 0.3, bias: bool = True):
        super().__init__(D, I, "silu", bias)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.drop(self.act(self.gate_proj(x)) * self.up_proj(x)))


def run_seeded(mlp: nn.Module, x: torch.Tensor, chunk: int, mode: str, seed: int = 11):
    """``run`` from a fixed seed; also the RNG state the caller sees after forward + backward."""
    torch.manual_seed(seed)
    result = run(mlp, x, chunk, mode)
    return result, torch.get_rng_state()


@pytest.mark.parametrize("chunk", [4, 7, 13])  # 50 tokens: 13, 8 and 4 chunks, with and without remainders
@pytest.mark.parametrize("shape", [(50, D), (2, 25, D)], ids=["2d", "3d"])
def test_dropout_recompute_replays_the_forward_masks(chunk, shape):
    """Regression: the backward recompute drew fresh dropout masks, so the gradient was not the gradient of the
    returned output. With each chunk's RNG state replayed, output and every gradient equal the naive loop's
    (plain autograd over the same chunks from the same seed: the same masks), and the caller's RNG stream after
    backward is the naive loop's (the recompute draws inside a fork)."""
    mlp = DropoutMLP().train()
    x = torch.randn(shape, requires_grad=True)
    got, got_state = run_seeded(mlp, x, chunk, "recompute")
    ref, ref_state = run_seeded(mlp, x, chunk, "naive")
    assert_same(got, ref)
    assert torch.equal(got_state, ref_state), "the recompute moved the caller's RNG stream"
    assert not torch.equal(run_seeded(mlp, x, chunk, "naive", seed=12)[0][1], ref[1]), "dropout is not random"


def test_dropout_gradient_is_the_derivative_of_the_output():
    """float64: the directional derivative of <output, g> along a random direction of (x, every weight) equals a
    central finite difference of the returned output (evaluated from the same seed, hence the same masks)."""
    mlp = DropoutMLP().double().train()
    x = torch.randn(3, 9, D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 9, D, dtype=torch.float64)
    params = list(mlp.parameters())

    def loss(seed: int = 5) -> torch.Tensor:
        torch.manual_seed(seed)
        return (mini_sequence_mlp(x, mlp.forward, params, 4) * g).sum()

    loss().backward()
    gen = torch.Generator().manual_seed(2)
    dirs = [torch.randn(t.shape, dtype=t.dtype, generator=gen) for t in [x, *params]]
    analytic = sum(float((t.grad * v).sum()) for t, v in zip([x, *params], dirs))
    eps = 1e-6
    values = []
    with torch.no_grad():
        for sign in (1.0, -2.0, 1.0):  # +eps, then -eps, then back
            for t, v in zip([x, *params], dirs):
                t.add_(sign * eps * v)
            values.append(float(loss()))
    numeric = (values[0] - values[1]) / (2 * eps)
    assert math.isclose(analytic, numeric, rel_tol=1e-6), (analytic, numeric)


@pytest.mark.parametrize("post_op_saves_output", [False, True])
def test_dropout_under_checkpointing_matches_naive(post_op_saves_output):
    """Activation checkpointing around a layer whose MLP has dropout: whether the layer's recompute stops before the
    MLP or runs it again, MsT's chunk recomputes replay the masks of the forward that produced the output."""
    mlp = DropoutMLP().train()

    def layer(h: torch.Tensor, mode: str) -> torch.Tensor:
        y = mini_sequence_mlp(h * 2, mlp.forward, list(mlp.parameters()), 16, mode=mode)
        return h + (y * y if post_op_saves_output else y)

    x = torch.randn(2, 50, D)
    results = []
    for mode in ("naive", "recompute"):
        mlp.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        torch.manual_seed(3)
        out = torch.utils.checkpoint.checkpoint(layer, xi, mode, use_reentrant=False)
        out.sum().backward()
        results.append(((out.detach(), xi.grad, {n: p.grad for n, p in mlp.named_parameters()}), torch.get_rng_state()))
    assert_same(results[1][0], results[0][0])
    assert torch.equal(results[1][1], results[0][1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA generator's replay")
def test_dropout_replay_on_cuda():
    """On CUDA the device generator is captured and replayed (dropout draws from it), and its stream after
    backward is the naive loop's."""
    mlp = DropoutMLP().cuda().train()
    x = torch.randn(2, 25, D, device="cuda")
    g = torch.randn(2, 25, D, device="cuda")
    results = []
    for mode in ("naive", "recompute"):
        mlp.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        torch.manual_seed(4)
        out = mini_sequence_mlp(xi, mlp.forward, list(mlp.parameters()), 7, mode=mode)
        out.backward(g)
        results.append(((out.detach(), xi.grad, {n: p.grad for n, p in mlp.named_parameters()}),
                        torch.cuda.get_rng_state()))
    assert_same(results[1][0], results[0][0])
    assert torch.equal(results[1][1], results[0][1])
