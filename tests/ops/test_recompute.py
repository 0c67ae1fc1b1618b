"""mst.ops.recompute: the RNG state a chunk's recompute replays, kept only for chunks that drew random numbers."""
import torch

from mst.ops import mini_sequence_mlp
from mst.ops.recompute import ChunkRNGStates


def test_a_chunk_that_draws_nothing_keeps_no_state():
    rng = ChunkRNGStates(torch.zeros(1))
    rng.capture()
    torch.ones(3).sum()  # deterministic work
    rng.settle()
    rng.capture()
    torch.rand(3)  # a draw (dropout's mask)
    rng.settle()
    assert rng.states[0] is None and rng.states[1] is not None
    with rng.replay(0):
        a = torch.rand(2)  # no state to replay: the caller's stream goes on
    with rng.replay(1):
        replayed = torch.rand(3)
    rng_again = ChunkRNGStates(torch.zeros(1))
    torch.manual_seed(7)
    rng_again.capture()
    first = torch.rand(3)
    rng_again.settle()
    with rng_again.replay(0):
        assert torch.equal(torch.rand(3), first)
    assert a.shape == (2,) and replayed.shape == (3,)


def test_deterministic_mlp_stores_no_generator_state(monkeypatch):
    """A plain MLP over 8 chunks saves no 5 KB CPU generator copy per chunk; dropout keeps one per chunk."""
    kept = []
    settle = ChunkRNGStates.settle

    def spy(self):
        settle(self)
        kept.append(self.states[-1] is not None)

    monkeypatch.setattr(ChunkRNGStates, "settle", spy)
    x = torch.randn(2, 64, 16, requires_grad=True)
    w = torch.randn(16, 16, requires_grad=True)
    mini_sequence_mlp(x, lambda h: h @ w, [w], chunk_tokens=16).sum().backward()
    assert kept == [False] * 8
    kept.clear()
    mini_sequence_mlp(x, lambda h: torch.nn.functional.dropout(h @ w, 0.5), [w], chunk_tokens=16).sum().backward()
    assert kept == [True] * 8
