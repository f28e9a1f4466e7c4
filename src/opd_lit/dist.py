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
    """The global rank of this process: the process group's once it is up, before that the
    launcher's environment (0 when single)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    env = os.environ
    if "RANK" in env:  # torchrun, or Lightning once the process group is up
        return int(env["RANK"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return int(env["SLURM_PROCID"])
    local = int(env.get("LOCAL_RANK", 0))
    node = int(env.get("NODE_RANK", env.get("GROUP_RANK", 0)))
    # Lightning's launcher on node n > 0: not rank 0, whatever the local rank
    return local if node == 0 else node * 1_000_000 + local


def is_launch_rank_zero() -> bool:
    """True in the process that owns the job's side effects (global rank 0)."""
    return launch_rank() == 0


