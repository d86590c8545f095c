"""What every benchmark script shares: the machine's description, the report's layout, a moto S3
server, and launching a training run (shards made by the pipeline, ``deepspeed`` with its output in a log).

Each script prints a Markdown section: a ``## title``, a ``Setup:`` line, a
``Hardware:`` line, a table and its notes; with ``--json PATH`` it also writes
its numbers there (``bench/run_all.py`` collects both).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from launch import local_s3  # noqa: E402

# Credentials for the moto server: any values do, since it checks none. Shared by the
# scripts that start one (the tests use their own, tests/conftest.py).
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "bench-access-key",
    "AWS_SECRET_ACCESS_KEY": "bench-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}

MB = 1e6
"""Decimal megabyte: sizes in the reports are 10^6 bytes."""


# -- the machine --------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> Optional[float]:
    """1-minute load average: other work on the cores skews timings, scaling most of all."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def hardware(device: Any = None, packages: Sequence[str] = ("torch",)) -> dict[str, Any]:
    """The machine and the versions that matter for a benchmark, for its ``Hardware:`` line.

    ``packages``: modules whose ``__version__`` to list; with "torch" also its CPU threads.
    ``device``: a torch.device (or name); a CUDA one adds the GPU's name and the CUDA version.
    """
    from importlib import metadata

    info: dict[str, Any] = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "usable_cores": usable_cores()}
    for name in packages:
        if name == "torch":
            import torch

            info["torch_threads"] = torch.get_num_threads()
            info["torch"] = torch.__version__  # the local build tag (+cpu, +cu124) is not in the metadata
        else:  # the installed version, without importing it (DeepSpeed and Ray print on import)
            info[name] = metadata.version(name)
    info["python"] = platform.python_version()
    info["platform"] = platform.platform()
    if device is not None and str(device).startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


# -- the report ---------------------------------------------------------------------------------


def key_values(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def print_header(title: str, setup: dict[str, Any], hw: dict[str, Any]) -> None:
    """The opening of every report: ``## title``, the ``Setup:`` line, the ``Hardware:`` line."""
    print(f"## {title}\n")
    print("Setup: " + key_values(setup) + "\n")
    print("Hardware: " + key_values(hw) + "\n")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A Markdown table; ``align`` holds one letter per column, l or r (default: first l, others r)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Optional[Path], data: dict[str, Any], indent: int = 2) -> None:
    """Write the results to ``path`` (the scripts' ``--json``); nothing when it is None."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, default=str) + "\n")


# -- S3 on loopback -----------------------------------------------------------------------------
# The project's own local endpoint (launch/local_s3.py), with the benchmarks' credentials.

free_port = local_s3.free_port


def moto_server(log_path: Optional[Path] = None, set_env: bool = False):
    """A moto S3 server process on loopback for a ``with`` block; yields its URL (see launch/local_s3.py)."""
    return local_s3.server(log_path, credentials=S3_ENV, set_env=set_env)


def s3_bucket(endpoint: str, prefix: str = "bench") -> str:
    """A fresh bucket on the server at ``endpoint`` (credentials from the environment); 's3://<name>'."""
    return local_s3.create_bucket(endpoint, prefix=prefix)


# -- launching training ---------------------------------------------------------------------------


def deepspeed_command(ranks: int, script: Path, config: Path, overrides: Sequence[str],
                      script_args: Sequence[str] = ()) -> list[str]:
    """``deepspeed --num_gpus N script [script_args] --config config overrides...`` through this interpreter."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
            "--master_port", str(free_port()), str(script), *script_args, "--config", str(config), *overrides]


def run_to_log(cmd: Sequence[str], log_path: Path, timeout: float, env: Optional[dict[str, str]] = None,
               started: Optional[Callable[[], None]] = None) -> Union[int, str]:
    """Run ``cmd`` from the repository root with its output in ``log_path``; its exit status, or
    "timed out". A file, not a pipe: grandchildren (loader workers) could hold a pipe open. Its own
    process group, so that on a timeout the ranks it launched are killed with it."""
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


def training_env(**extra: str) -> dict[str, str]:
    """The environment for a training subprocess: unbuffered, one cache for DeepSpeed's JIT-built ops."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    return env


def make_shards(work: Path, locations: int, size: int) -> Path:
    """A shard set made by the real pipeline from a synthetic SSL4EO-S12 Zarr archive (4 samples a
    location, at least ``size`` px); returns the manifest's path."""
    from pipeline import synthetic

    size = 6 * -(-size // 6)  # the archive's 60 m bands are size / 6 px

    archive = work / "archive"
    per_file = min(8, locations)
    synthetic.make_ssl4eo_zarr(archive, splits={"train": max(1, -(-locations // per_file))},
                               samples_per_file=per_file, size=size, seed=0, products=("S1GRD", "S2L1C"))
    shards = work / "shards"
    proc = subprocess.run([sys.executable, "-m", "pipeline.preprocess", "--no-progress", "--source", "ssl4eo-zarr",
                           "--input", str(archive), "--output", str(shards), "--split", "train", "--workers", "1",
                           "--samples-per-shard", "8"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline.preprocess exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return shards / "manifest.json"
