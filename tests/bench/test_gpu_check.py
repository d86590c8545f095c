"""The GPU check runs end to end as a CPU dry run, so that it works the day a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def test_without_a_gpu_it_asks_for_the_dry_run(tmp_path):
    proc = gpu_check("--out", str(tmp_path / "gc"))
    assert proc.returncode == 2 and "--cpu-dry-run" in proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_dry_run_measures_every_step_and_writes_one_report(tmp_path):
    out = tmp_path / "gc"
    proc = gpu_check("--cpu-dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["dry_run"] is True
    assert {name: s["status"] for name, s in doc["steps"].items()} == dict.fromkeys(("sdpa", "train", "zero2",
                                                                                     "loader"), "ok")
    sdpa = doc["results"]["sdpa"]
    assert sdpa["backends"]["math"] == "runs" and {"flash_attention", "efficient_attention"} <= set(sdpa["backends"])
    train = doc["results"]["train"]
    assert set(train["results"]) == {"sdpa", "eager"} and all(r["samples_per_s"] > 0 for r in train["results"].values())
    zero2 = doc["results"]["zero2"]
    assert zero2["last"]["step"] == 4 and zero2["last"]["samples_per_s"] > 0  # the real launch/train.py ran
    assert "zero_stage: 2" in (out / "work" / "zero2" / "config.yaml").read_text()
    loader = doc["results"]["loader"]
    assert any(k.startswith("ShardLoader, local shards") for k in loader["rows"])
    report = (out / "gpu_check.md").read_text()
    assert report.startswith("# GPU check (CPU dry run") and "| zero2 | ok |" in report
