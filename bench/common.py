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
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from launch.demo import launchers, local_s3  # noqa: E402
from launch.demo.launchers import run_to_log, training_env  # noqa: E402,F401  (the scripts import them from here)

# Credentials for the moto server (it checks none): the project's loopback ones.
S3_ENV = dict(local_s3.LOOPBACK_CREDENTIALS)

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
# The project's own local endpoint (launch/demo/local_s3.py).

free_port = local_s3.free_port


def moto_server(log_path: Optional[Path] = None, set_env: bool = False):
    """A moto S3 server process on loopback for a ``with`` block; yields its URL (see launch/demo/local_s3.py)."""
    return local_s3.server(log_path, credentials=S3_ENV, set_env=set_env)


def s3_bucket(endpoint: str, prefix: str = "bench") -> str:
    """A fresh bucket on the server at ``endpoint`` (credentials from the environment); 's3://<name>'."""
    return local_s3.create_bucket(endpoint, prefix=prefix)


# -- launching training ---------------------------------------------------------------------------


def deepspeed_command(ranks: int, script: Path, config: Path, overrides: Sequence[str],
                      script_args: Sequence[str] = ()) -> list[str]:
    """``deepspeed --num_gpus N script [script_args] --config config overrides...`` through this interpreter."""
    return launchers.deepspeed_command(ranks, script, [*script_args, "--config", str(config), *overrides])


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


_PLANNED = re.compile(r"planned (\d+) samples in (\d+) shards .* in ([\d.]+)s; the driver keeps ([\d.]+) MB")


def plan_only_job(source: str, input_url: str, output: Path, workers: int, *args: str) -> dict[str, Any]:
    """``python -m pipeline.preprocess --plan-only`` as a user runs it; what its "planned ..." line says
    (samples, shards, planning seconds, MB the driver keeps) and its wall clock. Exits on a failed run."""
    cmd = [sys.executable, "-m", "pipeline.preprocess", "--source", source, "--input", input_url,
           "--output", str(output), "--workers", str(workers), "--no-progress", "--plan-only", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    planned = _PLANNED.search(proc.stdout)
    if proc.returncode != 0 or planned is None:
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
                 f"\n--- stderr\n{proc.stderr[-5000:]}")
    return {"workers": workers, "samples": int(planned[1]), "shards": int(planned[2]),
            "plan_seconds": float(planned[3]), "wall_seconds": wall, "driver_mb": float(planned[4])}


def upload_archive(endpoint: str, folder: Path) -> tuple[str, float]:
    """``folder`` copied into a fresh bucket of the S3 server at ``endpoint`` (this process's environment set to
    reach it as AWS): its URL 's3://<bucket>/archive' and the seconds the upload took."""
    import s3fs

    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    url = f"{s3_bucket(endpoint)}/archive"
    start = time.perf_counter()
    s3fs.S3FileSystem().put(str(folder) + "/", url, recursive=True)
    return url, time.perf_counter() - start
