"""Training under faults and misuse: one run per checkpoint folder, a corrupt `latest`, an outage during the
checkpoint upload, and a two-node run simulated with two torchrun launchers on loopback.

Real `deepspeed` / `torchrun` launches with CPU ranks; the S3 endpoint is the moto server, reached through a
fault-injecting proxy (`launch/demo/proxy.py`) where the test needs faults.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import DEBUG, S3_ENV, deepspeed, fresh_s3fs, ssl4eo_shards
from launch.demo import launchers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return ssl4eo_shards(tmp_path_factory.mktemp("reliability_data"))


def common(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--config", DEBUG, f"data.manifest={shards / 'manifest.json'}", f"run.dir={run_dir}",
            "train.log_every=1", "data.num_workers=1", *extra]


def steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def test_a_second_run_on_the_same_checkpoint_folder_is_refused_and_a_killed_one_is_taken_over(shards, tmp_path):
    ckpt = tmp_path / "ckpt"
    args = common(shards, tmp_path / "a", "train.max_steps=400", "checkpoint.every_steps=2", f"checkpoint.dir={ckpt}")
    log = open(tmp_path / "a.log", "w")
    first = subprocess.Popen(launchers.deepspeed_command(2, "launch/train.py", args), cwd=launchers.ROOT,
                             env=launchers.training_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (ckpt / "latest").exists():  # the first run trains and has committed a checkpoint
            assert first.poll() is None and time.time() < deadline, (tmp_path / "a.log").read_text()[-3000:]
            time.sleep(0.5)
        second = deepspeed(1, "launch/train.py", *common(shards, tmp_path / "b", "train.max_steps=4",
                                                          f"checkpoint.dir={ckpt}", "resume=auto"), check=False)
        assert second.returncode == 2
        assert "is being written by another run" in second.stderr and "launch/train.py run" in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # like a node lost: no clean-up, the lease stays behind
        first.wait()
        log.close()
    assert (ckpt / "_lease.json").exists()
    committed = json.loads((ckpt / "latest").read_text())["step"]
    resumed = deepspeed(2, "launch/train.py", *common(shards, tmp_path / "c", f"train.max_steps={committed + 2}",
                                                       "checkpoint.every_steps=2", f"checkpoint.dir={ckpt}",
                                                       "resume=auto"))
    assert "taking over the lease" in resumed.stdout + resumed.stderr and "its process is gone" in resumed.stderr
    assert f"at step {committed}" in resumed.stdout
    assert not (ckpt / "_lease.json").exists()
    # a run that stops on a user error after taking the folder gives it back: the corrected run is not refused
    wrong = deepspeed(1, "launch/train.py", *common(shards, tmp_path / "d", "train.max_steps=4",
                                                     f"checkpoint.dir={ckpt}", "resume=none"), check=False)
    assert wrong.returncode == 2 and "already holds committed checkpoints" in wrong.stderr
    assert not (ckpt / "_lease.json").exists()


def _alive_in_group(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that have not exited (zombies waiting for a parent count as gone)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def test_sigterm_to_a_training_job_gives_its_checkpoint_folder_back(shards, tmp_path):
    # A preemption or `scancel` signals every process of the job: the launcher, the ranks, their DataLoader
    # workers. The ranks stop through their error path: rank 0 gives checkpoint.dir back, so the next run (from
    # any host) starts at once instead of waiting out the lease's 5 minutes.
    ckpt = tmp_path / "ckpt"
    args = common(shards, tmp_path / "a", "train.max_steps=400", "checkpoint.every_steps=2", f"checkpoint.dir={ckpt}")
    log_path = tmp_path / "a.log"
    with open(log_path, "w") as log:
        job = subprocess.Popen(launchers.deepspeed_command(2, "launch/train.py", args), cwd=launchers.ROOT,
                               env=launchers.training_env(), stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
        try:
            deadline = time.time() + 300
            while not (ckpt / "latest").exists():
                assert job.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.5)
            assert (ckpt / "_lease.json").exists()
            os.killpg(job.pid, signal.SIGTERM)
            signalled = time.monotonic()
            job.wait(30)  # the `deepspeed` runner: SIGTERM ends it at once; DeepSpeed's launch.py and the ranks go on
            while _alive_in_group(job.pid) and time.monotonic() < signalled + 60:
                time.sleep(0.25)
            took = time.monotonic() - signalled
            assert not _alive_in_group(job.pid), log_path.read_text()[-3000:]
            assert took < 30  # the ranks' orderly stop, before DeepSpeed's launcher sends SIGKILL at 30 s
        finally:
            try:
                os.killpg(job.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            job.wait()
    text = log_path.read_text()
    assert text.count("training: SIGTERM received") == 2, text[-3000:]  # both ranks
    assert "still running" not in text  # the orderly stop, not the watchdog
    after = text[text.index("SIGTERM received"):]
    assert "Traceback" not in after and "Exception ignored" not in after, after[-3000:]  # a quiet stop
    assert not (ckpt / "_lease.json").exists(), text[-3000:]
    committed = json.loads((ckpt / "latest").read_text())["step"]
    resumed = deepspeed(1, "launch/train.py", *common(shards, tmp_path / "b", f"train.max_steps={committed + 1}",
                                                       f"checkpoint.dir={ckpt}", "resume=auto"))
    assert "taking over the lease" not in resumed.stdout + resumed.stderr and f"at step {committed}" in resumed.stdout


def test_a_corrupt_latest_falls_back_to_the_newest_complete_checkpoint(shards, tmp_path):
    ckpt = tmp_path / "ckpt"
    deepspeed(2, "launch/train.py", *common(shards, tmp_path / "a", "train.max_steps=4", "checkpoint.every_steps=2",
                                            "checkpoint.keep=2", f"checkpoint.dir={ckpt}"))
    (ckpt / "latest").write_text('{"tag": "step-000')  # torn write
    proc = deepspeed(2, "launch/train.py", *common(shards, tmp_path / "a", "train.max_steps=6",
                                                   "checkpoint.every_steps=2", "checkpoint.keep=2",
                                                   f"checkpoint.dir={ckpt}", "resume=auto"))
    assert f"{ckpt}/latest is unreadable" in proc.stderr and "using the newest complete checkpoint, step-00000004" \
        in proc.stderr
    assert "at step 4" in proc.stdout and steps(tmp_path / "a") == [1, 2, 3, 4, 5, 6]
    # nothing complete left to fall back on: a clear stop, exit 2
    (ckpt / "latest").write_text("not json")
    for step in ckpt.glob("step-*"):
        for record in (step / "_ranks").glob("*.json"):
            record.unlink()
    proc = deepspeed(1, "launch/train.py", *common(shards, tmp_path / "b", "train.max_steps=8",
                                                   f"checkpoint.dir={ckpt}", "resume=auto"), check=False)
    assert proc.returncode == 2 and "holds no other complete checkpoint" in proc.stderr


def test_checkpoint_uploads_ride_out_an_outage(shards, tmp_path, s3_bucket, store_proxy):
    bucket = s3_bucket.removeprefix("s3://")
    ckpt = f"{s3_bucket}/ck"
    store_proxy.trigger(f"/{bucket}/ck/step-00000002/".encode(), 40.0)  # the store goes away mid-upload, for
    # longer than botocore's and s3fs's own retries last: the project's retry window has to carry it
    proc = deepspeed(2, "launch/train.py", *common(shards, tmp_path / "run", "train.max_steps=4",
                                                   "checkpoint.every_steps=2", f"checkpoint.dir={ckpt}",
                                                   "storage.retry_window_s=120"),
                     env={"AWS_ENDPOINT_URL": store_proxy.url})
    assert store_proxy.triggered_at is not None  # the fault fired
    assert "retrying for up to 120 s" in proc.stderr and "succeeded again" in proc.stderr
    fs = fresh_s3fs()
    assert json.loads(fs.cat_file(f"{ckpt}/latest"))["tag"] == "step-00000004"
    for tag in ("step-00000002", "step-00000004"):
        assert len(fs.ls(f"{ckpt}/{tag}/_ranks")) == 2
    assert steps(tmp_path / "run") == [1, 2, 3, 4]
    assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr


def _two_nodes(args: list[str], tmp_path: Path, name: str) -> list[str]:
    """`torchrun --nnodes 2 --nproc_per_node 1` twice on this host (node ranks 0 and 1): two simulated nodes."""
    port = launchers.free_port()
    procs, logs = [], []
    for node in range(2):
        cmd = [*launchers.torchrun_command(1, "launch/train.py", args)]
        at = cmd.index("--nproc_per_node")
        cmd[at:at] = ["--nnodes", "2", "--node_rank", str(node), "--master_addr", "127.0.0.1"]
        cmd[cmd.index("--master_port") + 1] = str(port)
        logs.append(tmp_path / f"{name}-node{node}.log")
        procs.append(subprocess.Popen(cmd, cwd=launchers.ROOT, env=launchers.training_env(),
                                      stdout=open(logs[-1], "w"), stderr=subprocess.STDOUT, start_new_session=True))
    codes = [p.wait(timeout=600) for p in procs]
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(t[-3000:] for t in texts)
    return texts


def test_a_simulated_two_node_run_trains_checkpoints_to_s3_and_resumes(shards, tmp_path, s3_bucket):
    ckpt = f"{s3_bucket}/two-nodes"
    base = common(shards, tmp_path / "run", "train.max_steps=6", "checkpoint.every_steps=3", f"checkpoint.dir={ckpt}",
                  "deepspeed.zero_stage=2", f"data.cache_dir={tmp_path / 'cache'}")
    first = _two_nodes([*base, "train.stop_at_step=3"], tmp_path, "first")
    assert all("finished 3 steps" in t for t in first)
    second = _two_nodes([*base, "resume=auto"], tmp_path, "second")
    assert "at step 3" in second[0] and all("finished 6 steps" in t for t in second)
    assert steps(tmp_path / "run") == list(range(1, 7))
    # each simulated node downloaded the checkpoint into its own folder
    staged = sorted(p.name for p in (tmp_path / "run" / "staging").glob("resume-*"))
    assert len(staged) == 2 and staged[0].endswith("-node0") and staged[1].endswith("-node1")
    assert json.loads(fresh_s3fs().cat_file(f"{ckpt}/latest"))["tag"] == "step-00000006"


def test_a_missing_manifest_is_a_clear_error_not_a_traceback(tmp_path):
    proc = deepspeed(1, "launch/train.py", "--config", DEBUG, f"data.manifest={tmp_path / 'nope' / 'manifest.json'}",
                     f"run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2
    assert f"error: data.manifest: manifest not found: {tmp_path / 'nope' / 'manifest.json'}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_data_outage_longer_than_the_retry_window_exits_3_naming_the_shard(shards, tmp_path, s3_bucket,
                                                                               store_proxy):
    """The shards on S3; the store goes down for good as training first reads the third shard, with a 3 s retry
    window: `launch/train.py` stops with exit code 3 and one line naming the shard (README: exit codes), no
    traceback. botocore's retries are off: s3fs nests its own (5 x 5 attempts a ranged read), and with botocore's
    3 under each, one read takes about a minute to give up during an outage."""
    bucket = s3_bucket.removeprefix("s3://")
    fresh_s3fs().put(str(shards), f"{s3_bucket}/shards", recursive=True)
    store_proxy.trigger(f"GET /{bucket}/shards/train-000002.tar".encode(), 600.0)
    proc = deepspeed(1, "launch/train.py", "--config", DEBUG, f"data.manifest={s3_bucket}/shards/manifest.json",
                     f"run.dir={tmp_path / 'run'}", "train.log_every=1", "data.num_workers=1", "train.max_steps=40",
                     "storage.retry_window_s=3", "data.storage_options.config_kwargs.retries.max_attempts=1",
                     env={"AWS_ENDPOINT_URL": store_proxy.url}, check=False)
    assert store_proxy.triggered_at is not None, proc.stderr[-3000:]
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and "storage unreachable" in errors[-1] and "train-000002.tar" in errors[-1], errors
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
