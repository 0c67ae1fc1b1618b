"""mst.train.fit_contexts passes a given granularity on as given (0 is an error, not "the default")."""
import pytest

from mst.train import fit_contexts
from tests.utils import tiny_model


def test_zero_granularity_is_an_error_not_the_default():
    with pytest.raises(ValueError, match="granularity"):
        fit_contexts(lambda: tiny_model("llama"), ("mst",), start=16, max_len=64, granularity=0, budget_bytes=1 << 30)
