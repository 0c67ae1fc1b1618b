"""Checkpoint offload (``mst.apply(offload_checkpoints=True)``) is exact and really moves the checkpointed layer
inputs to the host: loss and every gradient equal the unpatched model's, and the tensors that go through
``save_on_cpu``'s pack hook are exactly one (batch, seq, d) layer input per decoder layer, packed on the CPU (on a
GPU machine: copied off the GPU while the layer inputs themselves were on it)."""
from __future__ import annotations

import pytest
import torch

import mst
from mst.integrations.offload import OffloadingCheckpoint
from tests.utils import assert_same_step, clone_model, make_input_ids, make_labels, tiny_model


class _RecordingSaveOnCpu(torch.autograd.graph.save_on_cpu):
    """``save_on_cpu`` that records (device before packing, packed tensor) for every tensor it packs."""

    packed: list[tuple[torch.device, torch.Tensor]] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pack = self.pack_hook

        def recording_pack(tensor):
            result = pack(tensor)
            _RecordingSaveOnCpu.packed.append((tensor.device, result[1]))
            return result

        self.pack_hook = recording_pack


@pytest.fixture
def recorded(monkeypatch):
    _RecordingSaveOnCpu.packed = []
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", _RecordingSaveOnCpu)
    return _RecordingSaveOnCpu.packed


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_offload_is_exact(model_type):
    ref = tiny_model(model_type)
    got = mst.apply(clone_model(ref), offload_checkpoints=True, mlp_chunk_tokens=16)
    ids = make_input_ids(2, 77)
    assert_same_step(ref, got, input_ids=ids, labels=make_labels(ids, "prefix"))


def _packed_layer_inputs(device: str, recorded) -> tuple[torch.nn.Module, torch.Tensor]:
    model = tiny_model("llama", num_hidden_layers=3).to(device)
    mst.apply(model, offload_checkpoints=True)
    ids = make_input_ids(2, 64).to(device)
    model(input_ids=ids, labels=ids).loss.backward()
    return model, ids


def test_offloaded_bytes_are_the_layer_inputs_on_cpu(recorded):
    model, ids = _packed_layer_inputs("cpu", recorded)
    cfg = model.config
    shapes = [tuple(t.shape) for _, t in recorded]
    assert shapes == [(*ids.shape, cfg.hidden_size)] * cfg.num_hidden_layers  # one checkpoint per layer, nothing else
    assert all(t.device.type == "cpu" for _, t in recorded)
    assert sum(t.numel() * t.element_size() for _, t in recorded) == \
        cfg.num_hidden_layers * ids.numel() * cfg.hidden_size * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to show a device -> host move")
def test_offloaded_bytes_leave_the_gpu(recorded):
    model, ids = _packed_layer_inputs("cuda", recorded)
    assert len(recorded) == model.config.num_hidden_layers
    for device, packed in recorded:
        assert device.type == "cuda" and packed.device.type == "cpu" and packed.is_pinned()


@pytest.mark.parametrize("kwargs", [{}, {"gradient_checkpointing_kwargs": {"use_reentrant": True}}],
                         ids=["default", "reentrant_asked"])
def test_offload_survives_hf_checkpointing_enable(recorded, kwargs):
    """HF's Trainer and TRL call ``gradient_checkpointing_enable`` when training starts: mst's offloading,
    non-reentrant checkpointing stays (HF's setter used to replace it silently); disable and revert are HF's /
    the user's state again."""
    ref = tiny_model("llama")
    got = mst.apply(clone_model(ref), mlp_chunk_tokens=16, offload_checkpoints=True)
    got.gradient_checkpointing_enable(**kwargs)
    assert all(isinstance(m._gradient_checkpointing_func, OffloadingCheckpoint)
               for m in got.modules() if hasattr(m, "_gradient_checkpointing_func"))
    ids = make_input_ids(2, 40)
    assert_same_step(ref, got, input_ids=ids, labels=make_labels(ids, "prefix"))
    assert len(recorded) == ref.config.num_hidden_layers  # one layer input per decoder layer went to the host
    got.gradient_checkpointing_disable()
    assert not got.is_activation_checkpointing
    mst.revert(got)
    assert "_set_gradient_checkpointing" not in got.__dict__
