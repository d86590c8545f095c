"""The preprocessing job on an existing Ray cluster, submitted through Ray's job API as the README shows.

A real head node (`ray start --head` on loopback, its dashboard serving the job API), then
`ray job submit --working-dir <checkout> -- python -m pipeline.preprocess ...`: the job's
driver runs under Ray's job supervisor and must join that cluster through the
``RAY_ADDRESS`` Ray gives it, not start an embedded instance. The head has 3 CPUs and
the job asks for ``--workers 1``, so the manifest's record of the cluster it ran on tells
the two apart.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import ROOT
from launch.demo.local_s3 import free_port
from pipeline import synthetic

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A one-node Ray cluster in its own process group; yields its job API address, the environment to reach it
    and the temp root it registered itself under (as `ray start` does under /tmp/ray by default)."""
    tmp_path = tmp_path_factory.mktemp("ray_head")
    port, dashboard = free_port(), free_port()
    temp_root = f"/tmp/r-{uuid.uuid4().hex[:8]}"  # short: Ray's unix sockets live under it
    temp_dir = f"{temp_root}/ray"  # where `ray start` writes ray_current_cluster, which ray.init() looks for
    # Ray 2.60's job API refuses requests without a token: the head and the client share one (Ray's token auth).
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                             "--num-cpus", "3", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                             "--dashboard-port", str(dashboard), "--temp-dir", temp_dir, "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        # Ready means a job can be submitted, not only listed: the dashboard answers `ray job list` before the
        # head's job agent has registered, and a submit in that gap fails with "500: No available agent to submit
        # job, please try again later" (seen on a loaded CI machine). So the probe is a no-op job, run to its end.
        deadline = time.time() + 180
        while True:
            ok = subprocess.run([RAY, "job", "submit", "--address", address, "--", sys.executable, "-c", "pass"],
                                env=env, capture_output=True, text=True, timeout=180)
            if ok.returncode == 0 and "succeeded" in ok.stdout and Path(temp_dir, "ray_current_cluster").exists():
                break
            if head.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"Ray head did not start: {(tmp_path / 'head.log').read_text()[-3000:]}\n"
                                   f"last probe: {ok.stderr[-2000:]}")
            time.sleep(2)
        yield address, env, temp_root
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything left in its group
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp_root, ignore_errors=True)


def test_ray_job_submit_runs_the_job_on_the_existing_cluster(tmp_path, ray_head):
    address, env, _ = ray_head
    archive, out = tmp_path / "tiff", tmp_path / "shards"
    synthetic.make_ssl4eo_tiff(str(archive), n_locations=2, size=24, seed=3)  # 2 locations x 4 seasons
    proc = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
                           sys.executable, "-m", "pipeline.preprocess", "--no-progress", "--source", "ssl4eo-tiff",
                           "--input", str(archive), "--output", str(out), "--workers", "1"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == 8 and manifest["quarantined"] == 0
    # the cluster's 3 CPUs, not an embedded instance of --workers 1
    assert {k: manifest["run"][k] for k in ("ray", "nodes", "cpus")} == {"ray": "existing", "nodes": 1, "cpus": 3}
    for text in ((out / "manifest.json").read_text(), proc.stdout, proc.stderr):  # the job's own log is in stdout
        assert env["RAY_AUTH_TOKEN"] not in text


def test_the_embedded_default_starts_its_own_instance_beside_a_running_cluster(tmp_path, ray_head):
    # A user with a local `ray start` cluster up runs the job without RAY_ADDRESS: ray.init() would find that
    # cluster through ray_current_cluster (RAY_TMPDIR points at where this head registered itself, as /tmp/ray
    # does by default) and join it, or refuse the job's num_cpus. The embedded default starts its own.
    _, env, temp_root = ray_head
    archive, out = tmp_path / "tiff", tmp_path / "shards"
    synthetic.make_ssl4eo_tiff(str(archive), n_locations=1, size=24, seed=4)  # 1 location x 4 seasons
    assert Path(temp_root, "ray", "ray_current_cluster").exists()
    job_env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")} | {"RAY_TMPDIR": temp_root}
    proc = subprocess.run([sys.executable, "-m", "pipeline.preprocess", "--no-progress", "--source", "ssl4eo-tiff",
                           "--input", str(archive), "--output", str(out), "--workers", "1"],
                          cwd=ROOT, env=job_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["totals"]["samples"] == 4
    assert {k: manifest["run"][k] for k in ("ray", "nodes", "cpus")} == {"ray": "embedded", "nodes": 1, "cpus": 1}
