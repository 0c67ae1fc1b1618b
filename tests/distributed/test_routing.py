"""The attention registry routing (mst.distributed.routing) on a one-process gloo group: while a model is
sequence-parallel only its attention is routed, and once the last one is torn down (or garbage-collected)
``ALL_ATTENTION_FUNCTIONS`` holds the very functions it held before, with no override left behind. Ulysses shares
the routing; its multi-rank setup / teardown cycles run in sp_worker.py."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.distributed as dist
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from mst.distributed import BACKENDS
from mst.distributed.routing import route, unroute
from tests.utils import clone_model, make_input_ids, tiny_model


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def registry() -> tuple[dict, dict]:
    """What HF looks up (name -> function) and the instance's own overrides (which would shadow a later
    ``AttentionInterface.register``)."""
    return dict(ALL_ATTENTION_FUNCTIONS), dict(ALL_ATTENTION_FUNCTIONS._local_mapping)


def assert_registry(before: tuple[dict, dict]) -> None:
    now = registry()
    assert now[0].keys() == before[0].keys() and all(now[0][k] is before[0][k] for k in before[0])
    assert now[1].keys() == before[1].keys() and all(now[1][k] is before[1][k] for k in before[1])


def loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss.detach()


@pytest.mark.parametrize("backend", ["lss", "allgather"])
def test_last_teardown_restores_the_registry(one_rank_group, backend: str) -> None:
    before = registry()
    ref = tiny_model("llama", attn_implementation="sdpa")
    ids = make_input_ids(2, 24)
    expected = loss(ref, ids)
    first, second = clone_model(ref), clone_model(ref)
    for model in (first, second):
        BACKENDS[backend].install(model, one_rank_group)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not before[0]["sdpa"]  # routed while SP models exist
    for model in (first, second, ref):  # one rank: SP attention is the whole attention; ref is not routed
        torch.testing.assert_close(loss(model, ids), expected)

    BACKENDS[backend].uninstall(first)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not before[0]["sdpa"]  # second is still sequence-parallel
    torch.testing.assert_close(loss(second, ids), expected)
    BACKENDS[backend].uninstall(second)
    assert_registry(before)
    BACKENDS[backend].uninstall(second)  # a second teardown is a no-op
    assert_registry(before)
    torch.testing.assert_close(loss(first, ids), expected)


def test_repeated_setup_and_teardown(one_rank_group) -> None:
    before = registry()
    model = tiny_model("llama", attn_implementation="sdpa")
    ids = make_input_ids(1, 16)
    expected = loss(model, ids)
    for backend in ("lss", "allgather", "lss"):
        BACKENDS[backend].install(model, one_rank_group)
        BACKENDS[backend].install(model, one_rank_group)  # installing again replaces, it does not stack
        torch.testing.assert_close(loss(model, ids), expected)
        BACKENDS[backend].uninstall(model)
        assert_registry(before)
        assert not any("_mst_sp_attention" in m.__dict__ for m in model.modules())


def test_a_model_dropped_without_teardown_releases_the_registry(one_rank_group) -> None:
    before = registry()
    kept, dropped = (tiny_model("llama", attn_implementation="sdpa") for _ in range(2))
    BACKENDS["lss"].install(kept, one_rank_group)
    BACKENDS["lss"].install(dropped, one_rank_group)
    del dropped
    gc.collect()
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not before[0]["sdpa"]  # kept is still routed
    del kept
    gc.collect()
    assert_registry(before)


def test_route_wraps_the_original_core_function() -> None:
    before = registry()
    model = tiny_model("llama", attn_implementation="sdpa")
    seen = []
    route(model, lambda core: seen.append(core) or core)
    route(model, lambda core: seen.append(core) or core)  # re-routed: the core is still the original, not a router
    assert seen == [before[0]["sdpa"]] * 2
    unroute(model)
    assert_registry(before)
