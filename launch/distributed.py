"""Process-group setup under every launcher we support, and `Runtime`: where this process stands.

`deepspeed` and `torchrun` export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT. Under Slurm's `srun` without a wrapper only SLURM_* variables
exist; they are translated here so that the same script runs everywhere.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn


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


def node_id() -> str:
    """This node of the job: host name and node rank (torchrun's GROUP_RANK, NODE_RANK, Slurm's SLURM_NODEID).

    Two launchers on one host (a simulated multi-node run) are two nodes: per-node work such as
    downloading a checkpoint must not share a folder between them."""
    rank = next((os.environ[k] for k in ("GROUP_RANK", "NODE_RANK", "SLURM_NODEID") if k in os.environ), "0")
    return f"{hostname()}-node{rank}"


def device_name() -> Optional[str]:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


LAUNCHER_VARIABLES = ("RANK", "SLURM_PROCID")


@dataclass
class Runtime:
    """Rank, world size and device of this process, and the few collectives the jobs use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def start(cls, always: bool = True) -> "Runtime":
        """Join the process group (``always``, or when a launcher's variables are there) and pick the device.

        ``always=False``: a plain ``python -m ...`` is one process and needs no process group
        (nor a free MASTER_PORT)."""
        if always or any(k in os.environ for k in LAUNCHER_VARIABLES):
            rank, world, local = init()
        else:
            rank, world, local = 0, 1, 0
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        return cls(rank, world, local, device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj: Any, everywhere: bool = True) -> Optional[list[Any]]:
        """``obj`` of every rank, in rank order, on every rank (or on rank 0 only; None elsewhere)."""
        if self.world_size == 1:
            return [obj]
        out: Optional[list[Any]] = [None] * self.world_size if (everywhere or self.is_main) else None
        if everywhere:
            dist.all_gather_object(out, obj)
        else:
            dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        return obj if self.world_size == 1 else broadcast_object(obj)

    def barrier(self) -> None:
        if self.world_size > 1:
            barrier()

    def on_main(self, fn: Callable[[], Any], expected: tuple[type[Exception], ...] = ()) -> Any:
        """``fn()`` on rank 0, its result on every rank. An ``expected`` error there (a user error such as a
        ConfigError) is raised again on every rank with the same type and message, instead of leaving the
        other ranks waiting in a collective; any other error stops every rank."""
        if self.world_size == 1:
            return fn()
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except expected as err:
                outcome = ("error", (type(err), str(err)))
            except Exception as err:
                self.broadcast(("crash", f"{type(err).__name__}: {err}"))
                raise
        kind, value = self.broadcast(outcome)
        if kind == "error":
            raise value[0](value[1])
        if kind == "crash":
            raise RuntimeError(f"rank 0 failed: {value}")
        return value

    def sync_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers into every rank's ``module``."""
        if self.world_size == 1:
            return
        with torch.no_grad():
            for t in module.state_dict().values():
                dist.broadcast(t, src=0)
