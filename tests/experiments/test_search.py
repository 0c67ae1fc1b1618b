"""experiments.search: Table 7's fit_contexts (under AC's memory at context L, MsT fits a longer context, measured
training steps; a given granularity is passed on as given), and the length search of Tables 2-5 (its static probe and
planner seed are tested end to end in test_max_length.py)."""
import pytest

from experiments.models import build_model, preset_config
from experiments.search import fit_contexts
from tests.utils import tiny_model

OPTS = dict(mlp_chunk_tokens=64, lm_head_chunk_tokens=64)


def _build():
    return build_model(preset_config("tiny-llama"), seed=0)  # GPT-2 vocabulary: the LM head dominates activation memory


@pytest.mark.slow
def test_mst_fits_a_longer_context_than_ac_at_equal_memory():
    fit = fit_contexts(_build, ("ac", "mst"), start=256, max_len=512, mst_options=OPTS)
    assert fit["longest"] == {"ac": 256, "mst": 512}
    trials = {(t["strategy"], t["seq_len"]): t for t in fit["trials"]}
    assert set(trials) == {("ac", 256), ("ac", 512), ("mst", 256), ("mst", 512)}
    assert trials["ac", 256]["peak_bytes"] <= fit["budget_bytes"] < trials["ac", 512]["peak_bytes"]
    assert trials["mst", 512]["fits"] and not trials["ac", 512]["fits"]


def test_explicit_budget_nothing_fits():
    fit = fit_contexts(lambda: tiny_model("llama"), ("mst",), start=128, max_len=128, budget_bytes=1,
                       mst_options=OPTS)
    assert fit["longest"] == {"mst": 0} and fit["trials"][0]["fits"] is False


def test_zero_granularity_is_an_error_not_the_default():
    with pytest.raises(ValueError, match="granularity"):
        fit_contexts(lambda: tiny_model("llama"), ("mst",), start=16, max_len=64, granularity=0, budget_bytes=1 << 30)
