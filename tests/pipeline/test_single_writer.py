"""One writer per output, and a committed set checked before "nothing to do"; credentials in URLs never printed.

Real Ray jobs on a synthetic SSL4EO-S12 Zarr archive (the published layout).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_module
from pipeline import synthetic

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("single_writer")
    synthetic.make_ssl4eo_zarr(str(root), splits={"train": 3}, samples_per_file=4, size=48, seed=9)
    return root


def args(archive: Path, out: Path, *extra: str) -> list[str]:
    return ["--no-progress", "--source", "ssl4eo-zarr", "--input", str(archive), "--output", str(out),
            "--workers", "1", "--samples-per-shard", "2", *extra]


def test_a_second_job_on_the_same_output_is_refused_while_the_first_runs(archive, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-m", "pipeline.preprocess", *args(archive, out)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "_lease.json").exists():  # the first job has taken the output
        assert first.poll() is None and time.time() < deadline, "the first job ended before taking its lease"
        time.sleep(0.05)
    # Paused while the second job tries, so that "while the first runs" holds however fast the first would be.
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = run_module("pipeline.preprocess", *args(archive, out, "--s2-product", "L2A", "--overwrite"),
                            check=False)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2
    assert "is being written by another run" in second.stderr and "pipeline.preprocess --split train" in second.stderr
    assert "Started a local Ray instance" not in second.stderr  # refused before it started anything
    assert first.wait(timeout=300) == 0, first.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["s2_product"] == "L1C"  # the first job's set, whole
    assert manifest["totals"]["samples"] == 3 * 4 * 4
    assert not (out / "_lease.json").exists()  # released at the end


def test_a_rerun_checks_the_committed_shards_before_saying_nothing_to_do(archive, tmp_path):
    out = tmp_path / "out"
    run_module("pipeline.preprocess", *args(archive, out))
    manifest = json.loads((out / "manifest.json").read_text())
    victim = out / manifest["shards"][1]["name"]
    good = victim.read_bytes()
    victim.write_bytes(good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])  # same size, one byte flipped
    size_only = run_module("pipeline.preprocess", *args(archive, out, "--verify-existing", "size"))
    assert "nothing to do" in size_only.stdout  # the size check cannot see a flipped byte: as documented
    rerun = run_module("pipeline.preprocess", *args(archive, out))
    assert "1 damaged or missing shard(s)" in rerun.stdout and manifest["shards"][1]["name"] in rerun.stdout
    assert victim.read_bytes() == good  # rebuilt, byte-identical
    assert json.loads((out / "manifest.json").read_text())["shards"] == manifest["shards"]
    again = run_module("pipeline.preprocess", *args(archive, out))
    assert "checked by sha256); nothing to do." in again.stdout


def test_credentials_inside_urls_are_never_printed(archive, tmp_path):
    secret = "url-secret-do-not-print"
    for flag, value in (("--input", f"s3://AKIDEXAMPLE:{secret}@no-such-bucket/in"),
                        ("--output", f"s3://AKIDEXAMPLE:{secret}@no-such-bucket/out")):
        given = {"--input": str(archive), "--output": str(tmp_path / "o")} | {flag: value}
        proc = run_module("pipeline.preprocess", "--no-progress", "--source", "ssl4eo-zarr", "--input",
                          given["--input"], "--output", given["--output"], check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert secret not in proc.stdout + proc.stderr and "AKIDEXAMPLE" not in proc.stdout + proc.stderr
        assert "***@no-such-bucket" in proc.stderr
