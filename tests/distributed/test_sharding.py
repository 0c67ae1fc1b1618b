"""shard_batch: labels shifted before sharding, global positions, padding that changes nothing, clear errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mst.distributed import shard_batch


def batch(b: int = 2, s: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.arange(b * s).view(b, s) + 10
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.mark.parametrize("sp", [1, 2, 3, 4])
def test_shards_reassemble_to_hf_shift(sp: int) -> None:
    data = batch()
    shards = [shard_batch(data, r, sp) for r in range(sp)]
    full = {k: torch.cat([s[k] for s in shards], dim=1) for k in shards[0]}
    assert torch.equal(full["input_ids"], data["input_ids"])
    # the label of each shard's last token comes from the next shard: shifted before sharding
    assert torch.equal(full["shift_labels"], F.pad(data["labels"], (0, 1), value=-100)[:, 1:])
    assert torch.equal(full["position_ids"], torch.arange(12).expand(2, 12))
    assert shards[-1]["position_ids"][0, 0] == 12 - 12 // sp  # global, not restarting at 0


def test_already_shifted_labels_pass_through() -> None:
    data = batch()
    shifted = data.pop("labels") * 3
    out = shard_batch({**data, "shift_labels": shifted}, 1, 2)
    assert torch.equal(out["shift_labels"], shifted[:, 6:])


def test_padding_appends_ignored_tokens_with_continuing_positions() -> None:
    data = batch(s=10)
    shards = [shard_batch(data, r, 4, pad=True, pad_token_id=7) for r in range(4)]
    ids = torch.cat([s["input_ids"] for s in shards], dim=1)
    labels = torch.cat([s["shift_labels"] for s in shards], dim=1)
    assert ids.shape == (2, 12) and torch.equal(ids[:, 10:], torch.full((2, 2), 7))
    assert torch.equal(labels[:, 9:], torch.full((2, 3), -100))  # last real token has no next token either
    assert torch.equal(torch.cat([s["position_ids"] for s in shards], 1)[0], torch.arange(12))


def test_all_ones_mask_and_arange_positions_are_accepted() -> None:
    data = batch()
    data["attention_mask"] = torch.ones(2, 12, dtype=torch.long)
    data["position_ids"] = torch.arange(12)[None]
    assert shard_batch(data, 0, 2)["input_ids"].shape == (2, 6)


@pytest.mark.parametrize("change, message", [
    (lambda d: d, "not divisible by the SP size 5"),
    (lambda d: d.update(attention_mask=torch.ones(2, 12).index_fill_(1, torch.tensor([0]), 0)), "padding attention"),
    (lambda d: d.update(position_ids=torch.arange(12).remainder(6).expand(2, 12)), "packed sequences"),
    (lambda d: d.update(shift_labels=d["labels"]), "exactly one of labels"),
    (lambda d: d.update(labels=d["labels"][:, :5]), "does not match input_ids"),
    (lambda d: d.update(token_type_ids=d["labels"]), "unsupported batch keys"),
])
def test_bad_batches_raise(change, message: str) -> None:
    data = batch()
    change(data)
    with pytest.raises(ValueError, match=message):
        shard_batch(data, 0, 5 if message.startswith("not divisible") else 2)


@pytest.mark.parametrize("rank, sp", [(2, 2), (-1, 2), (0, 0)])
def test_bad_rank_raises(rank: int, sp: int) -> None:
    with pytest.raises(ValueError, match="0 <= rank < sp"):
        shard_batch(batch(), rank, sp)
