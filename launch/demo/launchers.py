"""Starting the project's commands as a user would, for the demo, the tests and the benchmarks.

Output goes to files, not pipes: DeepSpeed ranks and their loader workers are
grandchildren that could hold a pipe open after the launcher exits. Each
command gets its own process group, so a timeout kills the ranks it started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from launch.demo.local_s3 import free_port

ROOT = Path(__file__).resolve().parents[2]


def deepspeed_command(ranks: int, script: Union[str, Path], args: Sequence[str] = ()) -> list[str]:
    """``deepspeed --num_gpus N <script> args...`` through this interpreter, on a free port."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
            "--master_port", str(free_port()), str(script), *args]


def torchrun_command(ranks: int, script: Union[str, Path], args: Sequence[str] = ()) -> list[str]:
    """``torchrun --nproc_per_node N <script> args...`` through this interpreter, on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
            "--master_port", str(free_port()), str(script), *args]


def training_env(**extra: str) -> dict[str, str]:
    """The environment for a training subprocess: unbuffered, one cache for DeepSpeed's JIT-built ops."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    return env


def run_to_log(cmd: Sequence[str], log_path: Path, timeout: float, env: Optional[dict[str, str]] = None,
               started: Optional[Callable[[], None]] = None) -> Union[int, str]:
    """Run ``cmd`` from the repository root with stdout and stderr in ``log_path``; its exit status, or
    "timed out after N s" (the whole process group killed)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(list(cmd), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        if started is not None:
            started()
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return f"timed out after {timeout:.0f} s"


def run_captured(cmd: Sequence[str], timeout: float, env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository root; stdout and stderr captured apart (through files)."""
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(list(cmd), cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            code: int = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(list(cmd), code, out.read(), err.read())
