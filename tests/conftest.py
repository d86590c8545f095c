"""Shared fixtures: a real S3 endpoint (moto server process on loopback) and run helpers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import local_s3

ROOT = Path(__file__).resolve().parents[1]
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key-do-not-log",
    "AWS_DEFAULT_REGION": "us-east-1",
}


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


def run_module(module: str, *args: str, env: dict | None = None, timeout: float = 600, check: bool = True,
               cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` in a real subprocess, as a user would; output captured."""
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc
