"""The Zarr releases read from an object store that fails now and then (a fault-injecting proxy on loopback in
front of the S3 endpoint): transient errors are retried until the retry window ends, and then the job stops
(exit 3) naming the store and the file. They are never taken for damaged content: nothing is quarantined, and
the samples are those of a read without faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import ROOT, S3_ENV, fresh_s3fs

from pipeline import synthetic
from pipeline.shards import Sample
from pipeline.sources import SOURCES, SourceOptions

ARCHIVES = {
    "ssl4eo-wds": lambda root: synthetic.make_ssl4eo_wds(root, splits={"train": 2}, samples_per_shard=3, size=18),
    "ssl4eo-zarr": lambda root: synthetic.make_ssl4eo_zarr(root, splits={"train": 2}, samples_per_file=3, size=18),
}
# No retries below ours from botocore (and, in this process, from s3fs: `S3FileSystem.retries`, which spans
# ~10-25 s): each fault reaches the pipeline's own retry window, so short outages do what a long one does.
NO_INNER_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 1}}}


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    base = tmp_path_factory.mktemp("zarr-releases")
    for name, make in ARCHIVES.items():
        make(base / name)
    return base


def _read(source: str, url: str, options: SourceOptions):
    """Plan the train split in this process (the inventory jobs one after the other), then read every item:
    ([(key, s1 bytes, s2 bytes)], [(key, reason)], rejections while planning)."""
    reader = SOURCES[source](url, options)
    items, rejects = reader.plan("train", lambda fn, args: [fn(a) for a in args])
    samples, rejected = [], []
    for r in reader.read(list(items), "train"):
        if isinstance(r, Sample):
            samples.append((r.key, r.s1.tobytes(), r.s2.tobytes()))
        else:
            rejected.append((r.key, r.reason))
    return samples, rejected, [(r.key, r.reason) for r in rejects]


@pytest.mark.parametrize("source", sorted(ARCHIVES))
def test_planning_and_reading_outlast_outages_and_throttling(archives, source, s3_bucket, store_proxy, monkeypatch):
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # s3fs's setting (a class attribute): one attempt
    url = f"{s3_bucket}/{source}"
    fresh_s3fs().put(str(archives / source), url, recursive=True)
    want, none, no_rejects = _read(source, str(archives / source), SourceOptions())
    assert want and none == [] and no_rejects == []

    options = SourceOptions(storage_options={"skip_instance_cache": True, "endpoint_url": store_proxy.url,
                                             **NO_INNER_RETRIES})
    store_proxy.faults(0.2, "slowdown")  # one new connection in five answered 503 SlowDown, all along
    reader = SOURCES[source](url, options)
    store_proxy.outage(3.0)  # planning waits it out
    items, rejects = reader.plan("train", lambda fn, args: [fn(a) for a in args])
    assert rejects == [] and [it.key for it in items] == [k for k, _, _ in want]
    refused = store_proxy.refused
    store_proxy.outage(3.0)  # and so do the reads, with every open connection cut
    got = [(r.key, r.s1.tobytes(), r.s2.tobytes()) if isinstance(r, Sample) else (r.key, r.reason)
           for r in reader.read(list(items), "train")]
    assert got == want  # every sample, byte for byte, none quarantined
    assert store_proxy.refused > refused > 0


@pytest.mark.slow
@pytest.mark.parametrize("source,when", [("ssl4eo-wds", "shard tasks"), ("ssl4eo-zarr", "shard tasks"),
                                         ("ssl4eo-wds", "listing")])
def test_an_outage_longer_than_the_retry_window_stops_the_job(archives, source, when, s3_bucket, store_proxy,
                                                              tmp_path):
    """The store goes down (once the shard tasks start, or before the job lists its input) and stays down: the job
    stops with exit 3 and an error naming what it was reading, commits nothing and quarantines nothing (a rerun
    later builds the whole set)."""
    url = f"{s3_bucket}/{source}"
    fresh_s3fs().put(str(archives / source), url, recursive=True)
    out = tmp_path / "out"
    env = {**os.environ, **S3_ENV, "AWS_ENDPOINT_URL": store_proxy.url, "PYTHONUNBUFFERED": "1"}
    if when == "listing":
        store_proxy.outage(600)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.preprocess", "--no-progress", "--source", source, "--input", url,
         "--output", str(out), "--split", "train", "--workers", "1", "--retry-window-s", "3",
         "--storage-options", json.dumps(NO_INNER_RETRIES)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout if when == "shard tasks" else ():  # the plan is made: the shard tasks start now
        lines.append(line)
        if "] planned " in line:
            store_proxy.outage(600)
            break
    t0 = time.monotonic()
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 3, "".join(lines) + stdout + stderr
    assert time.monotonic() - t0 < 120  # the 3 s window, not the outage's 600 s
    error = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "storage unreachable" in error[0], stderr[-3000:]
    # the file being read when the window ran out, or the input folder being listed
    assert url.removeprefix("s3://") + ("/train/" if when == "shard tasks" else "") in error[0]
    assert "Traceback" not in error[0]
    assert not (out / "manifest.json").exists() and not (out / "quarantine.jsonl").exists()


@pytest.mark.parametrize("depth", [0, 1, 8])
def test_every_read_ahead_depth_reads_the_same_samples(archives, s3_bucket, depth):
    """From S3 the WebDataset reader keeps `read_ahead` locations' requests in flight on threads (0: none); the
    samples and their order are those of the local read whatever the depth, including a depth larger than the
    number of locations."""
    url = f"{s3_bucket}/ssl4eo-wds"
    fresh_s3fs().put(str(archives / "ssl4eo-wds"), url, recursive=True)
    want, _, _ = _read("ssl4eo-wds", str(archives / "ssl4eo-wds"), SourceOptions())
    options = SourceOptions(storage_options={"skip_instance_cache": True}, read_ahead=depth)
    got, rejected, _ = _read("ssl4eo-wds", url, options)
    assert rejected == [] and got == want


def test_a_zero_byte_member_reads_alike_from_s3_without_fetching_its_tar(tmp_path, s3_bucket, store_proxy):
    """An empty member (a damaged release) is quarantined with the reason a local read gives; an empty byte range
    is never requested (stores answer that invalid range with the whole object: GBs for a release's tar)."""
    import tarfile

    from pipeline.synthetic.wds_zarr import write_tar

    root = tmp_path / "archive"
    synthetic.make_ssl4eo_wds(root, splits={"train": 1}, samples_per_shard=2, size=18)
    for tar in root.glob("train/*/*.tar"):
        with tarfile.open(tar) as t:
            members = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
        write_tar(tar, members + [("zz_empty.zarr.zip", b"")])
    url = f"{s3_bucket}/archive"
    fresh_s3fs().put(str(root), url, recursive=True)
    _, local, _ = _read("ssl4eo-wds", str(root), SourceOptions())
    assert [key for key, _ in local] == [f"zz_empty_t{t}" for t in range(4)]  # each planned time step of it
    reader = SOURCES["ssl4eo-wds"](url, SourceOptions(storage_options={"skip_instance_cache": True,
                                                                       "endpoint_url": store_proxy.url}))
    items, _ = reader.plan("train", lambda fn, args: [fn(a) for a in args])
    store_proxy.reset()
    results = list(reader.read(list(items), "train"))
    details = [(r.key, r.reason, r.detail) for r in results if not isinstance(r, Sample)]
    local_reader = SOURCES["ssl4eo-wds"](str(root), SourceOptions())
    local_items, _ = local_reader.plan("train", lambda fn, args: [fn(a) for a in args])
    assert details == [(r.key, r.reason, r.detail) for r in local_reader.read(list(local_items), "train")
                       if not isinstance(r, Sample)]
    assert store_proxy.received < sum(p.stat().st_size for p in root.glob("train/*/*.tar"))  # no tar fetched whole


def test_a_reader_stopped_during_an_outage_leaves_no_fetch_behind(archives, s3_bucket, store_proxy, monkeypatch):
    """Read-ahead threads retrying through an outage give up once their reader is closed (a shard task that failed
    downstream), well within the retry window, instead of holding the process until the window ends."""
    import threading

    import s3fs

    from pipeline.storage import set_retry_window

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    set_retry_window(900)
    url = f"{s3_bucket}/ssl4eo-wds"
    fresh_s3fs().put(str(archives / "ssl4eo-wds"), url, recursive=True)
    reader = SOURCES["ssl4eo-wds"](url, SourceOptions(storage_options={"skip_instance_cache": True,
                                                                       "endpoint_url": store_proxy.url,
                                                                       **NO_INNER_RETRIES}))
    items, _ = reader.plan("train", lambda fn, args: [fn(a) for a in args])
    fetchers = lambda: [t for t in threading.enumerate() if t.name.startswith("member-fetch")]  # noqa: E731
    before = set(fetchers())
    store_proxy.latency(1.0)  # every request takes a second: the next locations' fetches are still in flight
    results = reader.read(list(items), "train")
    next(results)  # the first location's samples: its fetch is done, the next ones' are running
    store_proxy.outage(600)  # their connections cut, new ones refused: they retry (for up to 900 s)
    assert set(fetchers()) - before
    results.close()
    deadline = time.monotonic() + 60
    while set(fetchers()) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not set(fetchers()) - before


def test_read_ahead_fetches_neighbouring_members_in_one_request(archives, s3_bucket, monkeypatch):
    """Read ahead, the members of a batch of locations that lie side by side in their tar are one ranged request
    (`pipeline.sources.ranges`): with a batch as large as the archive, one request per tar; a batch of one location
    is a request per member, as without read-ahead."""
    from pipeline.sources import wds_zarr

    url = f"{s3_bucket}/ssl4eo-wds"
    fresh_s3fs().put(str(archives / "ssl4eo-wds"), url, recursive=True)
    want, _, _ = _read("ssl4eo-wds", str(archives / "ssl4eo-wds"), SourceOptions())
    requests = []
    fetch = wds_zarr.ZarrWebDataset._range
    monkeypatch.setattr(wds_zarr.ZarrWebDataset, "_range", lambda self, path, start, end, stop=None: requests.append(
        (path.rsplit("/", 2)[-2], start, end)) or fetch(self, path, start, end, stop))
    tars = 2 * 2  # two shard names, an S1 and an S2 tar each, three locations in each
    for depth, expected in ((8, tars), (2, 2 * tars), (1, 6 * 2), (0, 6 * 2)):
        options = SourceOptions(storage_options={"skip_instance_cache": True}, read_ahead=depth)
        reader = SOURCES["ssl4eo-wds"](url, options)
        items, _ = reader.plan("train", lambda fn, args: [fn(a) for a in args])
        requests.clear()
        got = [(r.key, r.s1.tobytes(), r.s2.tobytes()) for r in reader.read(list(items), "train")]
        assert got == want and len(requests) == expected, (depth, requests)


@pytest.mark.parametrize("depth", [0, 1, 8])
def test_a_tar_cut_short_after_planning_reads_as_the_local_one(tmp_path, s3_bucket, depth):
    """A tar that lost its end after planning (replaced while the job ran): with read-ahead the members of one request
    are judged apart, so the member cut in two and the one past the end are quarantined with the local read's words,
    and the members before them are read."""
    import tarfile

    root = tmp_path / "archive"
    synthetic.make_ssl4eo_wds(root, splits={"train": 1}, samples_per_shard=4, size=18, seed=21)
    url = f"{s3_bucket}/archive"
    fresh_s3fs().put(str(root), url, recursive=True)
    readers = {where: SOURCES["ssl4eo-wds"](where, SourceOptions(storage_options={"skip_instance_cache": True},
                                                                 read_ahead=depth)) for where in (str(root), url)}
    planned = {where: r.plan("train", lambda fn, args: [fn(a) for a in args])[0] for where, r in readers.items()}
    (tar,) = root.glob("train/S2L1C/*.tar")
    with tarfile.open(tar) as t:
        third = t.getmembers()[2]
    cut = tar.read_bytes()[:third.offset_data + third.size // 2]  # the third member cut in two, the fourth gone
    tar.write_bytes(cut)
    fresh_s3fs().pipe_file(f"{url}/{tar.relative_to(root)}", cut)
    results = {where: [(r.key, r.reason, r.detail) if not isinstance(r, Sample) else (r.key, r.s1.tobytes(),
                                                                                      r.s2.tobytes())
                       for r in readers[where].read(list(planned[where]), "train")] for where in readers}
    rejected = [r for r in results[str(root)] if len(r) == 3 and r[1] == "unreadable"]
    assert len(rejected) == 2 * 4 and all("truncated" in r[2] for r in rejected)  # two locations x 4 time steps
    assert sum(len(r) == 3 and not isinstance(r[1], str) for r in results[str(root)]) == 2 * 4  # two read
    assert results[url] == results[str(root)]


def test_a_location_read_twice_within_a_batch_reads_alike(archives, s3_bucket):
    """Items of one location that are not consecutive (A's first time steps, then B, then the rest of A) make A a
    location twice in one batch: its members are fetched once and each of its spans gets them."""
    url = f"{s3_bucket}/ssl4eo-wds"
    fresh_s3fs().put(str(archives / "ssl4eo-wds"), url, recursive=True)

    def read(where: str, options: SourceOptions) -> list:
        reader = SOURCES["ssl4eo-wds"](where, options)
        items, _ = reader.plan("train", lambda fn, args: [fn(a) for a in args])
        assert items[0].sample_id == items[3].sample_id != items[4].sample_id  # 4 time steps a location
        items = items[:2] + items[4:8] + items[2:4] + items[8:]
        return [(r.key, r.s1.tobytes(), r.s2.tobytes()) if isinstance(r, Sample) else (r.key, r.reason, r.detail)
                for r in reader.read(items, "train")]

    local = read(str(archives / "ssl4eo-wds"), SourceOptions())
    assert all(len(r) == 3 and isinstance(r[1], bytes) for r in local) and len(local) == 6 * 4
    assert read(url, SourceOptions(storage_options={"skip_instance_cache": True}, read_ahead=4)) == local
