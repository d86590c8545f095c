"""Process-group setup under every launcher we support, and small collective helpers.

`deepspeed` and `torchrun` export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT. Under Slurm's `srun` without a wrapper only SLURM_* variables
exist; they are translated here so that the same script runs everywhere.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from typing import Any, Optional

import torch
import torch.distributed as dist


def env_from_slurm() -> None:
    """Fill the torch.distributed variables from Slurm's when a launcher did not set them."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or "127.0.0.1"
        try:
            first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                   check=True).stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            first = first_host(nodes)
        os.environ["MASTER_ADDR"] = first
    os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list without scontrol: 'gpu[017-020,031],cpu1' → 'gpu017'."""
    m = re.match(r"^([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def init() -> tuple[int, int, int]:
    """Initialise the default process group (NCCL on GPUs, gloo on CPU, chosen by DeepSpeed).

    Returns (rank, world_size, local_rank).
    """
    import deepspeed

    env_from_slurm()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if not dist.is_initialized():
        deepspeed.init_distributed()
    release_shm_name()
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


def release_shm_name() -> None:
    """Unlink the name of this rank's DeepSpeed CPU all-reduce buffer in /dev/shm.

    DeepSpeed's CPU communication op creates one shared-memory segment per rank and never
    removes its name, so every run (and every killed run) would leave tens of MB in /dev/shm.
    Every rank maps all peers' segments while the process group starts; after a barrier the
    names are no longer needed, and the memory goes when the last process using it exits.
    """
    if torch.cuda.is_available() or not dist.is_initialized():
        return
    dist.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
            f"{os.environ['MASTER_PORT']}_{dist.get_rank()}")
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def hostname() -> str:
    return socket.gethostname()


def device_name() -> Optional[str]:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None
