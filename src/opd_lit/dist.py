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




def join_external_group() -> bool:
    """Under ``torchrun`` or SLURM (every rank started by the launcher, none by Lightning),
    start the process group now, before the job is planned, so rank 0 can plan and act alone
    and hand its decision to the others (:func:`broadcast_from_rank_zero`). Lightning later
    finds the group up and uses it. Returns whether such a group was joined."""
    import torch.distributed as dist
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if not dist.is_available() or dist.is_initialized():
        return False
    env = next((cls() for cls in (TorchElasticEnvironment, SLURMEnvironment) if cls.detect()), None)
    if env is None or env.world_size() <= 1:
        return False
    os.environ.setdefault("MASTER_ADDR", env.main_address)
    os.environ.setdefault("MASTER_PORT", str(env.main_port))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, rank=env.global_rank(), world_size=env.world_size())
    return True


def broadcast_from_rank_zero(make):
    """``make()`` on rank 0, its result on every rank (one process: just ``make()``)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return make()
    box = [make() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
