"""TrainConfig refuses numbers that would train silently wrong (NaN / negative learning rate, decay, clipping)."""
import math

import pytest

from experiments.train import TrainConfig


@pytest.mark.parametrize("field, value", [
    ("lr", 0.0), ("lr", -1e-4), ("lr", math.nan), ("lr", math.inf),
    ("weight_decay", -0.1), ("weight_decay", math.nan), ("weight_decay", math.inf),
    ("clip", 0.0), ("clip", -1.0), ("clip", math.nan),
    ("betas", (0.9, 1.0)), ("betas", (-0.1, 0.999)), ("betas", (math.nan, 0.999)),
])
def test_bad_numbers_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(steps=1, **{field: value})


def test_unclipped_and_undecayed_are_allowed():
    """clip=inf is "no clipping" (clip_grad_norm_ still reports the norm), weight_decay=0 "no decay"."""
    TrainConfig(steps=1, clip=math.inf, weight_decay=0.0, betas=(0.0, 0.0))
