"""Sequence-parallel MsT over gloo with 2 and 4 torchrun processes equals one process (loss and gradients).

Each run starts ``sp_worker.py`` under ``torchrun --standalone``; the worker does the comparisons (see its
docstring) and prints one line per passed case. Cases: vanilla Ulysses and MsT+Ulysses, batch 1 and 2, ignored
labels (including a shard with none valid), an odd length padded to a multiple of sp, an odd length without
padding (error), MsT with mini-sequence attention (Ulysses runs it on the gathered sequence), and on 4 ranks
kv-head replication (kv 2 < sp 4), SP 2 x DP 2, and heads not divisible (error);
two SP models torn down one at a time, and after every teardown of the last one the attention registry is HF's own.
"""
from __future__ import annotations

import pytest

from tests.distributed import run_sp_worker

CASES = {
    2: ["vanilla_mha_bs1", "mst_gqa_bs2_ignored", "mst_odd_len_padded", "mst_attention_gqa_bs2",
        "two_models_teardown", "odd_len_unpadded"],
    4: ["vanilla_mha_bs1", "mst_gqa_bs2_ignored", "mst_odd_len_padded", "mst_attention_gqa_bs2", "odd_len_unpadded",
        "vanilla_kv_replicated_bs2", "mst_sp2_dp2", "two_models_teardown", "heads_not_divisible"],
}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [2, 4])
def test_sequence_parallel_matches_single_process(nproc: int) -> None:
    stdout, out = run_sp_worker(nproc)
    for case in CASES[nproc]:
        assert f"CASE {case} OK" in stdout, f"{case} did not pass:\n{out[-6000:]}"
