"""A local S3-compatible endpoint for the demo, the tests and the benchmarks: moto's server on loopback.

It runs as its own process and is reached exactly like real S3, through the
standard AWS variables (AWS_ENDPOINT_URL and credentials), so s3fs, boto3,
Ray workers and DeepSpeed ranks all talk to it with no code of ours in between.
Objects live in the server's memory and are gone when it stops.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator, Optional

# Credentials for the loopback endpoint only (moto accepts any). Distinctive values, so that the tests can
# search everything a run wrote or printed for them.
LOOPBACK_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "loopback-access-key-id",
    "AWS_SECRET_ACCESS_KEY": "loopback-secret-key-do-not-log",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(log_path: Optional[Path] = None, timeout: float = 60.0,
          env: Optional[dict[str, str]] = None) -> tuple[subprocess.Popen, str]:
    """Start the server process; returns it and its URL once it answers. ``env``: variables for the server
    (``INITIAL_NO_AUTH_ACTION_COUNT``: moto checks credentials after that many requests)."""
    port = free_port()
    log = open(log_path, "wb") if log_path is not None else subprocess.DEVNULL
    try:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    finally:
        if log_path is not None:
            log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=1)
            return proc, url
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                stop(proc)
                tail = Path(log_path).read_text()[-2000:] if log_path is not None else ""
                raise RuntimeError(f"the local S3 endpoint (moto) did not start {tail}".strip())
            time.sleep(0.2)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextlib.contextmanager
def server(log_path: Optional[Path] = None, credentials: Optional[dict[str, str]] = None,
           set_env: bool = True) -> Iterator[str]:
    """The server for the duration of a ``with`` block; yields its URL.

    ``set_env``: point this process and its children at it (AWS_ENDPOINT_URL and ``credentials``),
    restoring the previous values afterwards.
    """
    env = {**(credentials or LOOPBACK_CREDENTIALS)}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_ENDPOINT_URL"]}
    proc, url = start(log_path)
    try:
        if set_env:
            os.environ.update(env, AWS_ENDPOINT_URL=url)
        yield url
    finally:
        if set_env:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        stop(proc)


def create_bucket(endpoint: str, name: Optional[str] = None, prefix: str = "bucket") -> str:
    """A bucket on the server at ``endpoint`` (credentials from the environment); returns 's3://<name>'."""
    import boto3

    name = name or f"{prefix}-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"
