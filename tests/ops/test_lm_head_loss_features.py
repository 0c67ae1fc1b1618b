"""Label smoothing and z-loss in both chunked LM-head losses, exact against plain PyTorch: ``F.cross_entropy(...,
label_smoothing=eps)`` plus ``lam * logsumexp(logits)^2`` per valid token, reduced alike (loss and the gradients of
h, W, b; fp32 ``assert_exact``). Every mode of ``chunked_lm_head_loss`` (summed with gradients in the forward,
per-token recompute, vocabulary-blocked weight gradient, loss alone without grad) and the module path, with
ignored tokens, chunk remainders, softcapping and logit scaling."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mst.ops import chunked_lm_head_loss, chunked_module_lm_head_loss
from tests.ops.test_chunked_lm_head_loss import V, loss_and_grads, make_inputs
from tests.utils import assert_exact

FEATURES = {"smoothing": dict(label_smoothing=0.1), "z_loss": dict(z_loss=1e-2),
            "both": dict(label_smoothing=0.2, z_loss=3e-2), "full_smoothing": dict(label_smoothing=1.0)}


def reference(h, w, y, *, bias=None, reduction="mean", label_smoothing=0.0, z_loss=0.0, logit_scale=None,
              final_logit_softcapping=None, num_items_in_batch=None, class_weights=None, **_):
    z = F.linear(h, w, bias).float().reshape(-1, w.shape[0])
    if logit_scale is not None:
        z = z * logit_scale
    if final_logit_softcapping is not None:
        z = torch.tanh(z / final_logit_softcapping) * final_logit_softcapping
    flat_y = y.reshape(-1)
    valid = flat_y != -100
    per_token = F.cross_entropy(z, flat_y, reduction="none", label_smoothing=label_smoothing, weight=class_weights)
    per_token = per_token + z_loss * torch.logsumexp(z, dim=-1).square() * valid
    if reduction == "none":
        return per_token.view(y.shape)
    total = per_token.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / (class_weights[flat_y[valid]].sum() if class_weights is not None else valid.sum())


def check(fn, feature: dict, bias=False, ignore_prefix=9, **kwargs):
    h, w, b, y = make_inputs(bias=bias, ignore_prefix=ignore_prefix)
    got = loss_and_grads(fn, h, w, b, y, **feature, **kwargs)
    ref = loss_and_grads(reference, h, w, b, y, **feature, **kwargs)
    assert_exact(got[0], ref[0], "loss")
    for name, g, r in zip(("hidden", "weight", "bias"), got[1], ref[1]):
        if r is not None:
            assert_exact(g, r, f"grad of {name}")


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("mode", [
    dict(reduction="mean"), dict(reduction="sum", chunk_tokens=5), dict(reduction="none", num_chunks=3),
    dict(reduction="mean", weight_grad_block_rows=10), dict(reduction="mean", num_items_in_batch=50, num_chunks=2),
], ids=["summed", "sum_C5", "per_token", "blocked_dW", "num_items"])
def test_chunked_lm_head_loss(feature, mode):
    check(chunked_lm_head_loss, FEATURES[feature], bias=True, **mode)


@pytest.mark.parametrize("feature", ["smoothing", "both"])
def test_with_softcap_and_scale(feature):
    check(chunked_lm_head_loss, FEATURES[feature], logit_scale=0.7, final_logit_softcapping=2.0)
    check(chunked_lm_head_loss, FEATURES[feature], logit_scale=0.7, final_logit_softcapping=2.0,
          weight_grad_block_rows=13)


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_module_path(feature, reduction):
    def module_loss(h, w, y, *, bias=None, **kwargs):  # a head function over the leaves, which get the gradients
        params = [w] + ([bias] if bias is not None else [])
        return chunked_module_lm_head_loss(h, lambda x: F.linear(x, w, bias), params, y, vocab_size=V, **kwargs)

    check(module_loss, FEATURES[feature], bias=True, reduction=reduction, chunk_tokens=6)


def test_loss_alone_without_grad():
    h, w, b, y = make_inputs(ignore_prefix=9)
    with torch.no_grad():
        for feature in FEATURES.values():
            assert_exact(chunked_lm_head_loss(h, w, y, num_chunks=3, **feature), reference(h, w, y, **feature))


@pytest.mark.parametrize("bad", [dict(label_smoothing=-0.1), dict(label_smoothing=1.5),
                                 dict(label_smoothing=float("nan")), dict(z_loss=-1.0), dict(z_loss=float("inf"))])
def test_bad_values_raise(bad):
    h, w, _, y = make_inputs()
    with pytest.raises(ValueError, match="label_smoothing|z_loss"):
        chunked_lm_head_loss(h, w, y, **bad)


STATS_MODES = {  # name -> (op, keyword arguments, whether the loss needs a gradient)
    "summed": ("weight", dict(), True),
    "per_token": ("weight", dict(reduction="none"), True),
    "blocked": ("weight", dict(weight_grad_block_rows=7), True),
    "no_grad": ("weight", dict(), False),
    "module": ("module", dict(), True),
}


@pytest.mark.parametrize("transform", [{}, dict(logit_scale=0.5, final_logit_softcapping=3.0)])
@pytest.mark.parametrize("mode", sorted(STATS_MODES))
def test_token_stats_are_the_full_logits_lse_and_argmax(mode, transform):
    """``TokenStats`` after the forward: each token's log-sum-exp and argmax of the finished logits (scaled and
    softcapped as the loss sees them), without N x V logits; NaN / -1 in a chunk whose labels are all ignored;
    the loss and its gradients unchanged; accuracy as TRL's over valid labels."""
    from mst.ops import TokenStats

    torch.manual_seed(0)
    op, kwargs, grad = STATS_MODES[mode]
    h, w, b, y = make_inputs(bias=True, ignore_prefix=9)
    z = F.linear(h, w, b).float().reshape(-1, V)
    if transform:
        z = torch.tanh(z * transform["logit_scale"] / transform["final_logit_softcapping"]) \
            * transform["final_logit_softcapping"]
    stats = TokenStats()
    chunk = 4  # chunks holding only ignored labels (the first two of row 0, one in row 1) are skipped
    with torch.set_grad_enabled(grad):
        if op == "weight":
            loss = chunked_lm_head_loss(h, w, y, bias=b, chunk_tokens=chunk, token_stats=stats, **kwargs,
                                        **transform)
        else:
            loss = chunked_module_lm_head_loss(h, lambda x: F.linear(x, w, b), [w, b], y, chunk_tokens=chunk,
                                               token_stats=stats, **kwargs, **transform)
    plain = reference(h, w, y, bias=b, **kwargs, **transform)
    assert_exact(loss, plain)
    ran = torch.isfinite(stats.lse)
    flat_y = y.reshape(-1)
    valid = flat_y != -100
    expected_ran = F.pad(valid, (0, -len(valid) % chunk)).view(-1, chunk).any(dim=1).repeat_interleave(chunk)
    assert torch.equal(ran, expected_ran[:len(valid)]) and not ran[:8].any()
    assert (stats.predictions[~ran] == -1).all()
    assert_exact(stats.lse[ran], torch.logsumexp(z, dim=-1)[ran])
    assert torch.equal(stats.predictions[ran], z.argmax(dim=-1)[ran])
    assert_exact(stats.accuracy(y), (z.argmax(dim=-1)[valid] == flat_y[valid]).float().mean())
    assert_exact(stats.z_loss(y), torch.logsumexp(z, dim=-1)[valid].square().mean())


def test_token_stats_before_a_loss_refuse_accuracy():
    from mst.ops import TokenStats

    with pytest.raises(ValueError, match="nothing recorded"):
        TokenStats().accuracy(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="nothing recorded"):
        TokenStats().z_loss(torch.zeros(3, dtype=torch.long))



CLASS_WEIGHTS = torch.rand(V, generator=torch.Generator().manual_seed(3)) * 2


@pytest.mark.parametrize("mode", [
    dict(reduction="mean"), dict(reduction="sum", chunk_tokens=5), dict(reduction="none", num_chunks=3),
    dict(reduction="mean", weight_grad_block_rows=10), dict(reduction="mean", num_items_in_batch=50, num_chunks=2),
    dict(reduction="mean", logit_scale=0.7, final_logit_softcapping=2.0),
], ids=["summed", "sum_C5", "per_token", "blocked_dW", "num_items", "softcap"])
def test_class_weights(mode):
    """``class_weights`` as ``F.cross_entropy(weight=)``: each token's loss times its label's weight, a mean over
    the valid labels' summed weights; loss and every gradient exact in every mode and through the module path."""
    check(chunked_lm_head_loss, dict(class_weights=CLASS_WEIGHTS), bias=True, **mode)

    def module_loss(h, w, y, *, bias=None, **kwargs):
        return chunked_module_lm_head_loss(h, lambda x: F.linear(x, w, bias), [w, bias], y, vocab_size=V, **kwargs)

    if "weight_grad_block_rows" not in mode:
        check(module_loss, dict(class_weights=CLASS_WEIGHTS), bias=True, **mode)


@pytest.mark.parametrize("options, message", [
    (dict(class_weights=torch.ones(V - 1)), "shape"),
    (dict(class_weights=torch.full((V,), float("nan"))), "finite"),
    (dict(class_weights=-torch.ones(V)), ">= 0"),
    (dict(class_weights=torch.ones(V), label_smoothing=0.1), "cannot be combined"),
])
def test_class_weights_bad_input(options, message):
    h, w, b, y = make_inputs()
    with pytest.raises(ValueError, match=message):
        chunked_lm_head_loss(h, w, y, **options)
