"""Start ``torch.distributed`` from the launcher's environment: torchrun, or SLURM's ``srun`` directly.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Under ``srun`` (one task per rank) the
rank variables come from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, and the batch script exports MASTER_ADDR
(first host of ``scontrol show hostnames $SLURM_JOB_NODELIST``) and MASTER_PORT (slurm/ulysses_scale.sh does).
The process-group backend follows the device: NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dist_backend: str | None  # process-group backend ("gloo", "nccl"); None: single process, not initialised


def rendezvous_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or SLURM's variables; (0, 1, 0) when neither is set.

    Raises ``RuntimeError`` naming the missing variables when a multi-process job lacks its rendezvous
    (MASTER_ADDR / MASTER_PORT), or when only part of the rank variables is set.
    """
    env = os.environ if env is None else env
    if "RANK" in env or "WORLD_SIZE" in env:
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    else:
        return 0, 1, 0
    missing = [n for n in names[:2] if n not in env]
    if missing:
        raise RuntimeError(f"incomplete rendezvous: {', '.join(missing)} not set (got {names[0]}/{names[1]} "
                           "partially); launch with torchrun, or with srun inside an sbatch job")
    try:
        rank, world, local = int(env[names[0]]), int(env[names[1]]), int(env.get(names[2], env[names[0]]))
    except ValueError as err:
        raise RuntimeError(f"rendezvous variables {names} must be integers: {err}") from None
    if world < 1:
        raise RuntimeError(f"world size {world} must be positive ({names[1]})")
    if not 0 <= rank < world:
        raise RuntimeError(f"rank {rank} is outside world size {world} ({names[0]}, {names[1]})")
    if local < 0:
        raise RuntimeError(f"local rank {local} must be non-negative ({names[2]})")
    if world > 1:
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not env.get(n)]
        if missing:
            raise RuntimeError(
                f"missing rendezvous variable(s) {', '.join(missing)} for a {world}-process job. torchrun sets them; "
                "under SLURM export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1) and "
                "MASTER_PORT=<free port> in the batch script before srun (see slurm/ulysses_scale.sh)")
    return rank, world, local


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Initialise the default process group from the environment (no-op for a single process); returns DistEnv.

    device: "auto" (CUDA when available, else CPU), "cuda" or "cpu". On CUDA each rank takes GPU ``local_rank``.
    timeout_s: how long a collective may wait for the other ranks before failing (positive, finite).
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not (
            math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive finite number of seconds, got {timeout_s!r}")
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' requested but torch.cuda.is_available() is False")
    rank, world, local = rendezvous_from_env()
    dev = torch.device("cuda", local % torch.cuda.device_count()) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1:
        return DistEnv(0, 1, 0, dev, None)
    dist_backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(dist_backend, init_method="env://", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(rank, world, local, dev, dist.get_backend())
