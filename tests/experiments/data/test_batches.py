"""experiments.data.batches: the stateless seeded micro-batch schedule and padding collate."""
import pytest
import torch

from experiments.data import MicroBatches, PackedDataset, pad_collate


@pytest.fixture
def dataset():
    return PackedDataset(torch.arange(70 * 8).numpy(), 8)  # 70 items


def test_each_epoch_is_a_seeded_permutation(dataset):
    mb = MicroBatches(dataset, micro_batch=3, seed=5)
    assert mb.per_epoch == 23  # 70 // 3, the incomplete last micro-batch is dropped
    epoch0 = [i for g in range(23) for i in mb.indices(g)]
    epoch1 = [i for g in range(23, 46) for i in mb.indices(g)]
    assert len(set(epoch0)) == 69 and len(set(epoch1)) == 69 and epoch0 != epoch1
    other_seed = [i for g in range(23) for i in MicroBatches(dataset, 3, seed=6).indices(g)]
    assert other_seed != epoch0


def test_schedule_is_stateless(dataset):
    mb = MicroBatches(dataset, micro_batch=2, seed=1)
    sequence = [mb.indices(g) for g in range(80)]
    fresh = MicroBatches(dataset, micro_batch=2, seed=1)
    assert [fresh.indices(g) for g in (79, 3, 40, 0)] == [sequence[g] for g in (79, 3, 40, 0)]
    batch = fresh(7)
    assert batch["input_ids"].shape == (2, 8)
    assert torch.equal(batch["input_ids"][0], dataset[sequence[7][0]]["input_ids"])


def test_micro_batches_validation(dataset):
    with pytest.raises(ValueError, match="micro_batch"):
        MicroBatches(dataset, 0)
    with pytest.raises(ValueError, match="fewer than one micro-batch"):
        MicroBatches(dataset, 71)
    with pytest.raises(ValueError, match=">= 0"):
        MicroBatches(dataset, 1).indices(-1)


def test_pad_collate_pads_right_and_masks_labels():
    items = [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, 2, 3])},
             {"input_ids": torch.tensor([4]), "labels": torch.tensor([4])}]
    out = pad_collate(items, pad_id=9)
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert out["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    same = pad_collate([items[0], items[0]], pad_id=9)
    assert set(same) == {"input_ids", "labels"} and same["input_ids"].shape == (2, 3)
