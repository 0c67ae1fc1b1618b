"""Rendezvous from torchrun / SLURM variables, with clear errors when a multi-process job lacks one."""
from __future__ import annotations

import pytest

from mst.distributed import init_distributed, rendezvous_from_env

MASTER = {"MASTER_ADDR": "node1", "MASTER_PORT": "29500"}


def test_single_process_without_any_variables() -> None:
    assert rendezvous_from_env({}) == (0, 1, 0)


def test_torchrun_variables() -> None:
    assert rendezvous_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", **MASTER}) == (3, 4, 1)


def test_slurm_variables_when_torchrun_is_absent() -> None:
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", **MASTER}
    assert rendezvous_from_env(env) == (1, 2, 1)


def test_torchrun_variables_win_over_slurm() -> None:
    env = {"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", **MASTER}
    assert rendezvous_from_env(env) == (0, 2, 0)


@pytest.mark.parametrize("env, message", [
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "MASTER_ADDR, MASTER_PORT"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "x"}, "MASTER_PORT"),
    ({"RANK": "0"}, "WORLD_SIZE not set"),
    ({"RANK": "2", "WORLD_SIZE": "2", **MASTER}, "outside world size"),
    ({"RANK": "a", "WORLD_SIZE": "2", **MASTER}, "must be integers"),
])
def test_missing_or_bad_rendezvous_raises(env: dict, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        rendezvous_from_env(env)


def test_init_single_process_does_not_start_a_group(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    env = init_distributed(device="cpu")
    assert (env.rank, env.world_size, env.dist_backend, env.device.type) == (0, 1, None, "cpu")


def test_init_rejects_unknown_device() -> None:
    with pytest.raises(ValueError, match="device must be"):
        init_distributed(device="tpu")
