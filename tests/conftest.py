"""Test-wide setup.

- One intra-op thread: the tests run tiny tensors, where OpenMP's second thread only adds spin-waiting; on a
  shared 2-core machine under load that made ``tests/ops`` 40x slower (70 s instead of 1.8 s). Subprocesses
  (torchrun tests) keep their own settings.
- An autouse seed fixture: every test starts from the same RNG state, so random tiny models and inputs are
  reproducible regardless of test order or which subset runs.
"""
from __future__ import annotations

import random

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def seed_everything():
    """Seed python and torch (all devices) before each test."""
    random.seed(0)
    torch.manual_seed(0)
    yield
