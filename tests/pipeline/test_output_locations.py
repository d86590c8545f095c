"""Where a shard set goes (issue 15, item 11): ``--overwrite``, ``file://`` URLs, S3 publishing under a kill, memory://.

The Ray tests launch the real job in a subprocess on one small synthetic SSL4EO-S12 v1.1 file (3 locations x 4
acquisitions = 12 samples). Expected values come from outside the job: totals and keys from the generator's
inventory, hashes from hashlib over the bytes found, and "a clean run" is the same invocation into a fresh local
folder (`clean`), whose bytes the other outputs must reproduce.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, live_session_members, run_module
from pipeline import synthetic

ARGS = ["--no-progress", "--source", "ssl4eo-zarr", "--workers", "1"]
A = ["--samples-per-shard", "3"]  # 12 samples -> 4 shards of 3
B = ["--samples-per-shard", "5", "--s2-offset", "keep"]  # different settings: 3 shards of 5, 5, 2
TIMES = 4  # acquisitions per location ("four timestamps each", SSL4EO-S12 v1.1 README)
SHARD = re.compile(r"^train-\d{6}\.tar$")


def preprocess(*args: str) -> subprocess.CompletedProcess:
    return run_module("pipeline.preprocess", *ARGS, *args)


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tar_keys(data: bytes) -> list[str]:
    """Sample keys of a tar, in order (webdataset: the member name up to its first dot), read with tarfile."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers()))


def without_run(manifest: dict) -> dict:
    """A manifest less its `run` section, the one part that describes the execution rather than the set."""
    return {k: v for k, v in manifest.items() if k != "run"}


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("archive")
    inventory = synthetic.make_ssl4eo_zarr(str(root), splits={"train": 1}, samples_per_file=3, size=48, seed=21)
    return root, inventory


@pytest.fixture(scope="module")
def expected_keys(archive) -> set[str]:
    """Every sample the archive holds, from the generator's inventory: location id x acquisition."""
    ids = [i for file_ids in archive[1]["splits"]["train"]["samples"] for i in file_ids]
    assert len(ids) == 3
    return {f"{i}_t{t}" for i in ids for t in range(TIMES)}


@pytest.fixture(scope="module")
def clean(archive, tmp_path_factory) -> Path:
    """Settings A into a fresh plain local path: the reference the other outputs are compared with."""
    out = tmp_path_factory.mktemp("clean") / "shards"
    preprocess("--input", str(archive[0]), "--output", str(out), *A)
    return out


@pytest.mark.slow
def test_overwrite_replaces_the_set_and_leaves_no_old_shard(archive, clean, expected_keys, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(clean, out)
    old = read_manifest(out)
    assert [s["name"] for s in old["shards"]] == [f"train-{i:06d}.tar" for i in range(4)]  # 12 / 3

    preprocess("--input", str(archive[0]), "--output", str(out), *B, "--overwrite")
    m = read_manifest(out)
    assert (m["settings"]["samples_per_shard"], m["settings"]["s2_offset"]) == (5, "keep")
    names = [s["name"] for s in m["shards"]]
    assert names == [f"train-{i:06d}.tar" for i in range(3)]  # ceil(12 / 5)
    # Only B's shards are left: A's train-000003.tar is gone, and the names B reuses hold B's bytes.
    assert sorted(p.name for p in out.glob("*.tar")) == names
    assert all(s["sha256"] != o["sha256"] for s, o in zip(m["shards"], old["shards"]))
    keys = []
    for s in m["shards"]:
        data = (out / s["name"]).read_bytes()
        assert (len(data), sha256(data)) == (s["bytes"], s["sha256"])
        keys += tar_keys(data)
    assert [len(tar_keys((out / n).read_bytes())) for n in names] == [5, 5, 2]
    quarantined = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) and set(keys) | {q["key"] for q in quarantined} == expected_keys
    assert m["totals"] == {"shards": 3, "samples": len(expected_keys) - len(quarantined),
                           "input_samples": len(expected_keys),
                           "quarantined": len(quarantined), "bytes": sum(s["bytes"] for s in m["shards"])}


@pytest.mark.slow
def test_file_url_output_is_the_same_set_as_a_plain_path(archive, clean, tmp_path):
    out = tmp_path / "via-url"
    preprocess("--input", str(archive[0]), "--output", out.as_uri(), *A)  # file:///...
    m, reference = read_manifest(out), read_manifest(clean)
    assert m["shards"] == reference["shards"] and m["totals"] == reference["totals"]
    for s in m["shards"]:
        data = (out / s["name"]).read_bytes()
        assert data == (clean / s["name"]).read_bytes() and sha256(data) == s["sha256"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in clean.iterdir())
    assert not (ROOT / "file:").exists()  # the URL was not taken for a relative folder name


def _kill_session(sid: int, deadline: float) -> None:
    """SIGKILL every process of the job's session (driver, Ray's raylet and workers) until none is left:
    as if the machine died, so no worker finishes the upload it was in."""
    while pids := live_session_members(sid):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert time.time() < deadline, f"processes {pids} of the killed job would not die"
        time.sleep(0.05)


@pytest.mark.slow
def test_s3_shards_are_whole_or_absent_after_a_kill_and_a_rerun_completes(archive, clean, s3_bucket, s3_endpoint):
    import boto3

    bucket = s3_bucket[len("s3://"):]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)

    def objects() -> dict[str, int]:
        listing = s3.list_objects_v2(Bucket=bucket, Prefix="shards/").get("Contents", [])
        return {o["Key"][len("shards/"):]: o["Size"] for o in listing}

    def body(name: str) -> bytes:
        return s3.get_object(Bucket=bucket, Key=f"shards/{name}")["Body"].read()

    reference = read_manifest(clean)
    names = [s["name"] for s in reference["shards"]]
    args = ["--input", str(archive[0]), "--output", f"{s3_bucket}/shards", *A]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.preprocess", *ARGS, *args], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while not any(SHARD.match(k) for k in objects()):  # kill as soon as the first shard name appears
            assert proc.poll() is None, "the job ended before it could be killed"
            assert time.time() < deadline
            time.sleep(0.02)
    finally:
        _kill_session(proc.pid, deadline + 60)
    assert proc.wait() == -signal.SIGKILL  # the fault happened: the job did not finish on its own
    left = {k for k in objects() if SHARD.match(k)}
    print("LEFT", sorted(left))
    assert 1 <= len(left) < len(names) and "manifest.json" not in objects()  # killed partway through the shards
    for name in sorted(left):  # an object under a final name is a whole shard, byte for byte, never a piece
        assert body(name) == (clean / name).read_bytes(), f"{name}: not the shard a clean run writes"

    preprocess(*args)  # the rerun takes the dead run's lease over and finishes the set
    m = json.loads(body("manifest.json"))
    assert without_run(m) == without_run(reference)
    assert {k for k in objects() if SHARD.match(k)} == set(names)
    for s in m["shards"]:
        data = body(s["name"])
        assert sha256(data) == s["sha256"] and data == (clean / s["name"]).read_bytes()


# -- memory:// ------------------------------------------------------------------------------------------------


def test_memory_urls_work_in_process():
    """memory:// is one process's filesystem: the storage layer writes a shard set there and the manifest and
    a reader without worker processes read it back (the training and evaluation configs' memory:// use)."""
    from launch.data.loader import LoaderSettings, PassLoader
    from pipeline.manifest import load_manifest
    from pipeline.storage import url_to_fs
    from shardfactory import make_shard_set

    url = make_shard_set(f"memory://{uuid.uuid4().hex}/train", (3, 2), hw=8, s2_channels=4)
    manifest = load_manifest(url)
    fs, _ = url_to_fs(url)
    for shard in manifest.shards:
        data = fs.cat_file(url_to_fs(shard.url)[1])
        assert shard.url.startswith("memory://") and sha256(data) == shard.sha256 and len(data) == shard.bytes
    batches = list(PassLoader(manifest, LoaderSettings(num_workers=0), batch_size=2))
    # the factory writes each sample's number, 0 .. 4 in manifest order, into s2[0, 0, 0]
    assert [n for b in batches for n in b["s2"][:, 0, 0, 0].tolist()] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("flag", ["--input", "--output"])
def test_the_job_refuses_memory_urls_clearly(tmp_path, flag):
    # The job's Ray workers are other processes: a memory:// input would be invisible to them and a memory://
    # output lost with them (it used to exit 0 having "written" shards nowhere). Refused before Ray starts.
    locations = {"--input": str(tmp_path), "--output": str(tmp_path / "out"), flag: "memory://somewhere/x"}
    proc = run_module("pipeline.preprocess", *ARGS, "--input", locations["--input"], "--output",
                      locations["--output"], check=False, timeout=60)
    assert proc.returncode == 2
    assert f"{flag} memory://somewhere/x: an in-memory filesystem lives inside one process" in proc.stderr
    assert "Ray instance" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_an_outage_while_shards_are_uploaded_is_waited_out(archive, clean, s3_bucket, store_proxy):
    """S3 goes down for 10 s as the second shard's PUT starts (the request cut, every new connection refused):
    longer than s3fs's own retries last, with botocore's off, so the upload reaches the job's retry window, which
    waits the outage out. The set is the clean run's, byte for byte, and nothing is quarantined."""
    import boto3

    bucket = s3_bucket[len("s3://"):]
    store_proxy.trigger(f"PUT /{bucket}/shards/train-000001.tar".encode(), 10.0)
    proc = run_module("pipeline.preprocess", *ARGS, "--input", str(archive[0]), "--output", f"{s3_bucket}/shards",
                      *A, "--storage-options", json.dumps({"config_kwargs": {"retries": {"max_attempts": 1}}}),
                      env={"AWS_ENDPOINT_URL": store_proxy.url})
    assert store_proxy.triggered_at is not None and store_proxy.refused > 0
    assert "retrying for up to" in proc.stderr and "succeeded again after" in proc.stderr  # our window, not s3fs's
    s3 = boto3.client("s3")  # the endpoint itself, from the environment
    body = lambda key: s3.get_object(Bucket=bucket, Key=f"shards/{key}")["Body"].read()  # noqa: E731
    m = json.loads(body("manifest.json"))
    assert without_run(m) == without_run(read_manifest(clean)) and m["totals"]["quarantined"] == 0
    for s in m["shards"]:
        assert body(s["name"]) == (clean / s["name"]).read_bytes()


@pytest.mark.slow
def test_an_outage_at_the_commit_stops_the_job_uncommitted_and_a_rerun_reuses_every_shard(archive, clean, s3_bucket,
                                                                                           store_proxy):
    """S3 goes down for good as the manifest's PUT starts, with a 3 s retry window: the job stops with exit 3 and
    the message names the manifest, the set is not committed, and the lease is not waited for a second time. A
    rerun once the store is back takes the lease over, reuses every shard (their progress records and sha256
    check out) and commits the clean run's set, byte for byte."""
    import boto3

    bucket = s3_bucket[len("s3://"):]
    args = ["--input", str(archive[0]), "--output", f"{s3_bucket}/shards", *A]
    store_proxy.trigger(f"PUT /{bucket}/shards/manifest.json".encode(), 600.0)
    proc = run_module("pipeline.preprocess", *ARGS, *args, "--retry-window-s", "3", "--storage-options",
                      json.dumps({"config_kwargs": {"retries": {"max_attempts": 1}}}),
                      env={"AWS_ENDPOINT_URL": store_proxy.url}, check=False)
    assert store_proxy.triggered_at is not None
    assert proc.returncode == 3, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: storage unreachable for") and "shards/manifest.json" in last, last
    assert "Traceback" not in proc.stderr and "could not release the lease" in proc.stderr
    s3 = boto3.client("s3")  # the endpoint itself, from the environment
    stored = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="shards/").get("Contents", [])}
    names = [s["name"] for s in read_manifest(clean)["shards"]]
    assert "shards/manifest.json" not in stored and {f"shards/{n}" for n in names} <= stored

    store_proxy.outage(0.0)
    rerun = preprocess(*args)
    assert f"reusing {len(names)} shards completed by an earlier run" in rerun.stdout
    body = lambda key: s3.get_object(Bucket=bucket, Key=f"shards/{key}")["Body"].read()  # noqa: E731
    m = json.loads(body("manifest.json"))
    assert without_run(m) == without_run(read_manifest(clean))
    for s in m["shards"]:
        assert body(s["name"]) == (clean / s["name"]).read_bytes()
