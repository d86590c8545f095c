"""The output side of a preprocessing job meets an object store that fails (a fault-injecting proxy on loopback in
front of the S3 endpoint): every call a run or a rerun makes on the output (checking the committed shards, finding
reusable ones, probing that it can write, taking and releasing its lease) waits transient errors out for the
retry window, and an outage longer than the window is reported as one (`StorageUnavailable`, exit 3 in a job),
never as a damaged shard or a refused write. The job-level cases are in test_output_locations.py."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import pytest
from conftest import fresh_s3fs

from pipeline.commit import damaged_shards
from pipeline.job import progress_path
from pipeline.lease import LEASE, Lease
from pipeline.plan import ShardTask, reusable_record
from pipeline.storage import StorageUnavailable, check_writable, set_retry_window, sha256_remote, url_to_fs

# No retries below ours from botocore, nor from s3fs (`S3FileSystem.retries`, a class attribute, spans ~10-25 s):
# each fault reaches the pipeline's own retry window, so a 3 s outage does what a long one does.
NO_INNER_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 1}}}
MB = 1 << 20


@pytest.fixture
def out(s3_bucket, store_proxy, monkeypatch):
    """(filesystem through the proxy, bucket path, {name: bytes}) with three 'shards' of 2.5 MB stored."""
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    monkeypatch.setenv("FUSMAE_RETRY_WINDOW_S", "60")
    rng = os.urandom
    shards = {f"train-{i:06d}.tar": rng(5 * MB // 2) for i in range(3)}
    direct = fresh_s3fs()
    for name, data in shards.items():
        direct.pipe_file(f"{s3_bucket[5:]}/shards/{name}", data)
    fs, root = url_to_fs(f"{s3_bucket}/shards", {"skip_instance_cache": True, "endpoint_url": store_proxy.url,
                                                 **NO_INNER_RETRIES})
    return fs, root, shards


def test_rehashing_a_shard_outlasts_an_outage_that_starts_mid_read(out, store_proxy):
    fs, root, shards = out
    name, data = next(iter(shards.items()))
    store_proxy.trigger(b"bytes=2097152-", 3.0)  # the ranged GET after the first (s3fs reads ahead 2 MB): cut
    assert sha256_remote(fs, f"{root}/{name}", chunk=MB) == hashlib.sha256(data).hexdigest()
    assert store_proxy.triggered_at is not None and store_proxy.refused > 0


def test_checking_a_committed_set_under_faults_finds_nothing_damaged(out, store_proxy):
    """A rerun's check of the committed shards (sizes, then sha256) while one new connection in three gets 503
    SlowDown and the store goes down for 3 s: no intact shard is called damaged; a really changed one still is."""
    fs, root, shards = out
    manifest = {"shards": [{"name": n, "bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                           for n, d in shards.items()]}
    store_proxy.faults(0.3, "slowdown")
    store_proxy.outage(3.0)
    assert damaged_shards(fs, root, manifest, "sha256") == []
    assert damaged_shards(fs, root, manifest, "size") == []
    manifest["shards"][1]["sha256"] = "0" * 64
    manifest["shards"][2]["bytes"] += 1
    assert damaged_shards(fs, root, manifest, "sha256") == ["train-000001.tar", "train-000002.tar"]
    assert store_proxy.refused > 0


def test_finding_reusable_shards_outlasts_an_outage(out, store_proxy):
    """A resumed run's look at an earlier run's progress record and tar: an outage is waited out, not taken for a
    shard to rebuild (which on a real set would redo hours of work)."""
    fs, root, shards = out
    name, data = next(iter(shards.items()))
    record = {"fingerprint": "f" * 64, "samples": 7, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    fresh_s3fs().pipe_file(progress_path(root, name), json.dumps(record).encode())
    task = ShardTask(0, name, [], "f" * 64)
    for verify, request in (("size", "HEAD"), ("sha256", "GET")):  # the tar's size, then its bytes
        store_proxy.trigger(f"{request} /{root}/{name}".encode(), 3.0)
        assert reusable_record(fs, root, task, verify) == record
        assert store_proxy.triggered_at is not None and store_proxy.refused > 0
        store_proxy.triggered_at = None
        store_proxy.reset()


def test_the_write_probe_reports_an_outage_as_one_not_as_a_refusal(out, store_proxy):
    fs, root, _ = out
    set_retry_window(2.0)
    store_proxy.outage(600.0)
    with pytest.raises(StorageUnavailable, match="storage unreachable for"):
        check_writable(fs, root)


def test_a_run_stopping_on_an_error_releases_its_lease_once_and_reports_its_own_error(out, store_proxy, caplog):
    """With the store down, the lease is not waited for a second time: one attempt, a warning saying the lease
    is left and how the next run takes it over, and the error the run stopped on is the one raised."""
    fs, root, _ = out
    url = f"s3://{root}"
    set_retry_window(2.0)
    options = {"skip_instance_cache": True, "endpoint_url": store_proxy.url, **NO_INNER_RETRIES}
    with caplog.at_level(logging.WARNING, logger="pipeline.lease"):
        with pytest.raises(StorageUnavailable, match="the manifest's PUT"):
            with Lease(url, "test", options):
                store_proxy.outage(600.0)
                raise StorageUnavailable("storage unreachable for 900 s: the manifest's PUT")
    assert "could not release the lease" in caplog.text and "--force" in caplog.text
    store_proxy.outage(0.0)
    assert fresh_s3fs().exists(f"{root}/{LEASE}")  # left behind, for the next run to take over

    with Lease(url, "test", options, force=True):  # taken over (this process is alive), then released
        pass
    assert not fresh_s3fs().exists(f"{root}/{LEASE}")


def test_a_release_that_fails_never_replaces_the_error_the_run_stops_on(out, store_proxy, caplog):
    """The store goes down for good while a run stops on its own error: the patient release waits out the window
    (2 s here), logs that the lease is left, and the run's error is the one raised."""
    fs, root, _ = out
    set_retry_window(2.0)
    options = {"skip_instance_cache": True, "endpoint_url": store_proxy.url, **NO_INNER_RETRIES}
    with caplog.at_level(logging.WARNING, logger="pipeline.lease"):
        with pytest.raises(ValueError, match="bad input"):
            with Lease(f"s3://{root}", "test", options):
                store_proxy.outage(600.0)
                raise ValueError("bad input")
    assert "could not release the lease" in caplog.text


def test_a_lease_is_taken_once_by_its_object_and_again_after_release(out, store_proxy):
    fs, root, _ = out
    lease = Lease(f"s3://{root}", "test", {"skip_instance_cache": True, "endpoint_url": store_proxy.url})
    with lease:
        with pytest.raises(RuntimeError, match="already held by this Lease"):
            lease.acquire()
    with lease:  # released, then taken again: its heartbeat runs
        assert lease.owns() and lease._thread is not None and lease._thread.is_alive()
    assert not fresh_s3fs().exists(f"{root}/{LEASE}")


def test_a_run_stopping_on_another_error_releases_its_lease_through_a_short_outage(out, store_proxy):
    """Any other error (a bad input, Ctrl-C) comes with the store up: the release is patient, so a blip as it
    reads the lease does not leave the lease behind to refuse the next run for 5 minutes."""
    fs, root, _ = out
    options = {"skip_instance_cache": True, "endpoint_url": store_proxy.url, **NO_INNER_RETRIES}
    with pytest.raises(ValueError, match="bad input"):
        with Lease(f"s3://{root}", "test", options):
            store_proxy.trigger(f"GET /{root}/{LEASE}".encode(), 3.0)
            raise ValueError("bad input")
    assert store_proxy.triggered_at is not None
    assert not fresh_s3fs().exists(f"{root}/{LEASE}")


def test_a_heartbeat_held_up_by_an_outage_does_not_overwrite_a_takeover(out, store_proxy, caplog):
    """The holder's heartbeat PUT meets an outage and is retried (the retry window is long); meanwhile another run,
    which reaches the store, takes the lease over (here with --force; after 5 minutes of silence by itself). When
    the store comes back the retried heartbeat must not land: it is a conditional PUT (If-Match the ETag of the
    holder's last write), so it fails, and the old holder stops its heartbeat saying it lost the lease. An
    unconditional PUT would overwrite the new holder's lease: the new run would be the one told it lost it."""
    fs, root, _ = out
    url = f"s3://{root}"
    set_retry_window(60.0)
    stalled = Lease(url, "stalled run", {"skip_instance_cache": True, "endpoint_url": store_proxy.url,
                                          **NO_INNER_RETRIES}, stale_after_s=1.0)  # a heartbeat every 0.25 s
    with caplog.at_level(logging.WARNING, logger="pipeline.lease"):
        stalled.acquire()
        store_proxy.trigger(f"PUT /{root}/{LEASE}".encode(), 4.0)  # the next heartbeat's PUT, and 4 s of outage
        deadline = time.monotonic() + 10
        while store_proxy.triggered_at is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        new = Lease(url, "new run", {"skip_instance_cache": True}, force=True).acquire()  # straight to the store
        try:
            stalled._thread.join(30)  # the retried heartbeat resolves after the outage; the thread ends
            assert not stalled._thread.is_alive()
            held = json.loads(fresh_s3fs().cat_file(f"{root}/{LEASE}"))
            assert held["owner"] == new.owner and held["what"] == "new run"
            assert f"was taken over by owner {new.owner[:12]}" in caplog.text
            time.sleep(1.0)  # the new holder's heartbeats (every 75 s by default: none yet) are its own
            assert new.owns()
        finally:
            new.release()
            stalled.release(patient=False)
    assert not fresh_s3fs().exists(f"{root}/{LEASE}")


def test_heartbeats_keep_a_lease_fresh_with_conditional_writes(out):
    # Each conditional heartbeat carries the ETag of the one before: a chain that broke would fail its second PUT
    # and stop the heartbeat as if the lease were lost.
    fs, root, _ = out
    lease = Lease(f"s3://{root}", "run", {"skip_instance_cache": True}, stale_after_s=0.4)  # a beat every 0.1 s
    with lease:
        beats = [lease.holder()["heartbeat"]]
        for _ in range(3):
            time.sleep(0.5)
            beats.append(lease.holder()["heartbeat"])
        assert beats == sorted(set(beats)) and lease._thread.is_alive()
        # each beat's ETag came from its own PUT's response: the chain tracks the stored object
        lease._stop.set()
        lease._thread.join(10)
        assert lease._etag == fresh_s3fs().info(f"{root}/{LEASE}")["ETag"]
    assert not fresh_s3fs().exists(f"{root}/{LEASE}")


def _orphan(exc: BaseException) -> None:
    """A task that fails with ``exc`` and is never awaited, collected: asyncio logs it as aiohttp's are logged."""
    import asyncio
    import gc

    async def fail():
        raise exc

    async def main():
        asyncio.get_running_loop().create_task(fail())
        await asyncio.sleep(0.01)

    asyncio.run(main())
    gc.collect()


def _orphan_future(exc: BaseException) -> None:
    """A future holding ``exc`` that nobody reads, collected: asyncio's "Future exception was never retrieved"."""
    import asyncio
    import gc

    async def main():
        asyncio.get_running_loop().create_future().set_exception(exc)

    asyncio.run(main())
    gc.collect()


def test_aiohttps_orphaned_connection_errors_are_dropped_and_nothing_else(caplog, monkeypatch):
    """What an outage makes aiohttp's sending tasks print, "Task exception was never retrieved" with a
    connection error, is dropped; the same for any other error is kept, and FUSMAE_LIBRARY_LOG_LEVEL=DEBUG
    keeps everything."""
    from pipeline.logs import drop_orphaned_connection_errors

    monkeypatch.setattr(logging.getLogger("asyncio"), "filters", [])
    drop_orphaned_connection_errors()
    drop_orphaned_connection_errors()
    assert len(logging.getLogger("asyncio").filters) == 1
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        _orphan(ConnectionResetError("Cannot write to closing transport"))
        assert "never retrieved" not in caplog.text
        from aiohttp import ServerDisconnectedError

        _orphan(ServerDisconnectedError())  # aiohttp's, not a built-in ConnectionError
        _orphan_future(ConnectionResetError("Cannot write to closing transport"))
        assert "never retrieved" not in caplog.text
        _orphan(RuntimeError("connection pool timeout must be > 0"))  # words are not a type
        assert "connection pool timeout must be > 0" in caplog.text
        _orphan(ValueError("a real bug"))
        assert "Task exception was never retrieved" in caplog.text and "a real bug" in caplog.text
        caplog.clear()
        monkeypatch.setenv("FUSMAE_LIBRARY_LOG_LEVEL", "DEBUG")
        _orphan(ConnectionResetError("Cannot write to closing transport"))
        assert "Cannot write to closing transport" in caplog.text
