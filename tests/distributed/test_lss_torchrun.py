"""LSS and the all-gather baseline over gloo with 2 and 4 torchrun processes equal one process (loss, gradients).

Runs ``sp_worker.py lss allgather`` (the same worker and cases as the Ulysses test, see its docstring): vanilla
and MsT, batch 1 and 2, ignored labels, an odd length padded, MsT with mini-sequence attention (LSS runs the
segment's queries by chunks), head counts Ulysses rejects (1 head on 2 ranks, 2
heads on 4), and on 4 ranks GQA with fewer kv heads than ranks and the 2 x 2 sequence x data grid, and two SP
models torn down one at a time. Every case also checks the counted collectives against
``mst.distributed.predict_step`` (calls and bytes, exactly) and that teardown restores the attention registry.
"""
from __future__ import annotations

import pytest

from tests.distributed import run_sp_worker

BACKENDS = ("lss", "allgather")
CASES = {2: ["vanilla_mha_bs1", "mst_gqa_bs2_ignored", "mst_odd_len_padded", "mst_attention_gqa_bs2",
            "mst_heads_not_divisible", "two_models_teardown"]}
CASES[4] = CASES[2] + ["vanilla_kv_replicated_bs2", "mst_sp2_dp2"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [2, 4])
def test_lss_matches_single_process(nproc: int) -> None:
    stdout, out = run_sp_worker(nproc, *BACKENDS)
    for backend in BACKENDS:
        for case in CASES[nproc]:
            assert f"CASE {backend}_{case} OK" in stdout, f"{backend} {case} did not pass:\n{out[-6000:]}"
