"""Where this process stands in a multi-process job, readable before ``torch.distributed`` starts.

Every launcher runs the entry point once per rank: Lightning's own launcher re-runs the same
command with ``LOCAL_RANK``/``NODE_RANK`` set, ``torchrun`` sets ``RANK``, SLURM sets
``SLURM_PROCID``. Job-level side effects (locks, MLflow run bookkeeping, moving or deleting
files) belong to global rank 0 alone; the other ranks only read.
"""

from __future__ import annotations

import os

import torch


def launch_rank() -> int:
    """The global rank of this process from the launcher's environment (0 when single)."""
    env = os.environ
    if "RANK" in env:  # torchrun, or Lightning once the process group is up
        return int(env["RANK"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return int(env["SLURM_PROCID"])
    local = int(env.get("LOCAL_RANK", 0))
    node = int(env.get("NODE_RANK", env.get("GROUP_RANK", 0)))
    if node == 0:
        return local
    return node * max(1, int(env.get("LOCAL_WORLD_SIZE", 1))) + local if "LOCAL_WORLD_SIZE" in env else -1


def is_launch_rank_zero() -> bool:
    """True in the process that owns the job's side effects (global rank 0)."""
    return launch_rank() == 0


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the running process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
