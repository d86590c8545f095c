"""`make demo` end to end at its smallest settings, and a failing stage named as such."""

from __future__ import annotations

import json

import pytest

from conftest import run_module

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
# The demo uses the user's S3 when these name one; the test session's own endpoint must not count as that.
NO_USER_STORE = {"AWS_ENDPOINT_URL": None, "FUSMAE_DEMO_BUCKET": None}


def test_demo_runs_every_stage_and_reports(tmp_path):
    out = tmp_path / "demo"
    proc = run_module("launch.demo", "--smallest", "--out", str(out), env=NO_USER_STORE)
    assert "Demo finished" in proc.stdout
    for stage in ("preprocess SSL4EO-S12 (Ray)", "pretrain, first half (DeepSpeed)",
                  "pretrain, resume=auto from the checkpoint (DeepSpeed)", "linear probe, pretrained encoder",
                  "linear probe, random initialisation"):
        assert f"=== {stage}: done" in proc.stdout
    assert "resumed from s3://fusmae-demo/demo/runs/pretrain/step-" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    for key in ("probe_pretrained", "probe_random_init"):
        assert 0.0 <= summary[key]["map_macro"] <= 1.0
    assert summary["steps"] == 16
    for picture in ("loss_curves.png", "reconstructions.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "![loss curves](loss_curves.png)" in report and "random initialisation" in report
    assert "<img" in (out / "report.html").read_text()
    # what went through the (now stopped) S3 endpoint is kept: shards, checkpoint pointer, exported encoder
    mirror = out / "s3-mirror"
    assert (mirror / "shards" / "ssl4eo" / "manifest.json").exists()
    assert json.loads((mirror / "runs" / "pretrain" / "latest").read_text())["step"] == 16
    assert (mirror / "runs" / "pretrain" / "encoder" / "model.safetensors").exists()


def test_a_failing_stage_says_which_and_why(tmp_path):
    empty = tmp_path / "not-an-archive"
    empty.mkdir()
    proc = run_module("launch.demo", "--smallest", "--store", "local", "--out", str(tmp_path / "demo"),
                      "--ssl4eo", str(empty), check=False)
    assert proc.returncode == 1
    assert "stage 'preprocess ssl4eo-zarr' failed" in proc.stderr and "no SSL4EO-S12 v1.1 Zarr files" in proc.stderr
