"""Shared fixtures and helpers: a real S3 endpoint (moto server process on loopback) and running the project's
commands in real subprocesses, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.demo import launchers, local_s3

ROOT = Path(__file__).resolve().parents[1]
S3_ENV = dict(local_s3.LOOPBACK_CREDENTIALS)
DEBUG = str(ROOT / "configs" / "debug.yaml")
free_port = local_s3.free_port


@pytest.fixture(autouse=True)
def _isolated_environment():
    """Every test gets back the environment it started with: a launcher variable one test sets (RANK=5,
    WORLD_SIZE=8, MASTER_ADDR) must not make a later test join a process group that does not exist.
    Function scope: set up after the session and module fixtures (the S3 endpoint's variables stay)."""
    before = dict(os.environ)
    yield
    if dict(os.environ) != before:
        os.environ.clear()
        os.environ.update(before)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A moto S3 server in its own process on loopback; yields its URL.

    The standard AWS variables point every client (boto3, s3fs, subprocesses, Ray
    workers) at it, exactly as a user's environment would point at real S3.
    """
    with local_s3.server(tmp_path_factory.mktemp("moto") / "moto.log", credentials=S3_ENV) as url:
        yield url


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket on the moto server; yields 's3://<bucket>'."""
    yield local_s3.create_bucket(s3_endpoint, prefix="test")


def fresh_s3fs():
    """An s3fs filesystem that sees what other processes wrote (no cached listings)."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def _checked(proc: subprocess.CompletedProcess, what: str, check: bool) -> subprocess.CompletedProcess:
    if check and proc.returncode != 0:
        raise AssertionError(f"{what} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def run_module(module: str, *args: str, env: dict | None = None, timeout: float = 600, check: bool = True,
               cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` in a real subprocess, as a user would; output captured.
    ``env`` adds variables to this process's environment; a None value removes one."""
    full_env = {k: v for k, v in {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}.items() if v is not None}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    return _checked(proc, f"{module} {' '.join(args)}", check)


def deepspeed(ranks: int, script: str, *args: str, env: dict | None = None, check: bool = True,
              timeout: float = 600) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N <script> args...`` on CPU ranks, as a user runs it; stdout/stderr captured."""
    cmd = launchers.deepspeed_command(ranks, ROOT / script, args)
    return _checked(launchers.run_captured(cmd, timeout, launchers.training_env(**(env or {}))), "deepspeed", check)


def torchrun(ranks: int, script: str, *args: str, env: dict | None = None, check: bool = True,
             timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N <script> args...``, as a user runs it; stdout/stderr captured."""
    cmd = launchers.torchrun_command(ranks, ROOT / script, args)
    return _checked(launchers.run_captured(cmd, timeout, launchers.training_env(**(env or {}))), "torchrun", check)


@pytest.fixture
def store_proxy(s3_endpoint):
    """A `StoreProxy` (byte counts, outages, resets, 503 SlowDown) on loopback in front of the moto server."""
    from urllib.parse import urlparse

    from launch.demo.proxy import StoreProxy

    up = urlparse(s3_endpoint)
    with StoreProxy((up.hostname, up.port)) as proxy:
        yield proxy


def bigearthnet_shards(root: Path, n_patches: int, seed: int, size: int = 48) -> Path:
    """A synthetic BigEarthNet v2 archive (published layout) sharded by the real pipeline, every split;
    returns the folder holding train/, validation/ and test/."""
    from pipeline import synthetic

    synthetic.make_bigearthnet(str(root / "archive"), n_patches=n_patches, size=size, seed=seed)
    run_module("pipeline.preprocess", "--no-progress", "--source", "bigearthnet", "--input", str(root / "archive"),
               "--output", str(root / "shards"), "--split", "all", "--workers", "1")
    return root / "shards"


def ssl4eo_shards(root: Path, seed: int = 11) -> Path:
    """A small SSL4EO-S12 Zarr archive sharded by the real pipeline: 24 samples in shards of 5, 5, 5, 5, 4."""
    from pipeline import synthetic

    synthetic.make_ssl4eo_zarr(str(root / "archive"), splits={"train": 2}, samples_per_file=3, size=48, seed=seed)
    run_module("pipeline.preprocess", "--no-progress", "--source", "ssl4eo-zarr", "--input", str(root / "archive"),
               "--output", str(root / "shards"), "--workers", "1", "--samples-per-shard", "5")
    return root / "shards"


def live_session_members(sid: int) -> list[int]:
    """Pids of the live (not zombie) processes of session ``sid``, from Linux /proc: a job started with
    ``start_new_session=True`` and its Ray raylet and workers, which have process groups of their own."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, _pgrp, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, IndexError):
            continue
        if int(session) == sid and state != "Z":
            pids.append(int(stat.parent.name))
    return pids
