"""Outages on the data path: ridden out with the same batches, or a clear stop; never silently skipped data.

The shards live on the moto S3 server behind a fault-injecting proxy on loopback (`launch/demo/proxy.py`);
the loader reaches the store through the proxy (``endpoint_url`` in its storage options).
"""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from launch.data.loader import LoaderSettings, ShardLoader
from pipeline.manifest import load_manifest
from pipeline.storage import RETRY_WINDOW_ENV, StorageUnavailable
from shardfactory import make_shard_set

pytestmark = pytest.mark.timeout(300)
SIZES = [5, 3, 6, 2]  # 16 samples


def take(loader, n):
    it = iter(loader)
    try:
        return list(itertools.islice(it, n))
    finally:
        it.close()


def same(got, want):
    assert [b["keys"] for b in got] == [b["keys"] for b in want]
    for g, w in zip(got, want):
        for name in ("s1", "s2", "crop", "flip"):
            assert torch.equal(g[name], w[name]), name


@pytest.fixture
def remote(s3_bucket):
    return load_manifest(make_shard_set(f"{s3_bucket}/shards", SIZES, hw=8, s2_channels=4, seed=11))


@pytest.mark.parametrize("kind", ["outage", "resets", "slowdown"])
def test_the_loader_rides_out_storage_trouble_with_the_same_batches(remote, store_proxy, monkeypatch, kind):
    monkeypatch.setenv(RETRY_WINDOW_ENV, "120")
    want = take(ShardLoader(remote, LoaderSettings(num_workers=2, shuffle_buffer=3), micro_batch_size=2, seed=4), 24)
    if kind == "outage":  # 8 s without a store, from the first read of the third shard on
        store_proxy.trigger(b"/shards/train-000002.tar", 8.0)
    else:  # a share of the connections reset at once, or answered 503 SlowDown
        store_proxy.faults(0.3, "reset" if kind == "resets" else "slowdown")
    settings = LoaderSettings(num_workers=2, shuffle_buffer=3, storage_options={"endpoint_url": store_proxy.url})
    loader = ShardLoader(remote, settings, micro_batch_size=2, seed=4)
    t0 = time.monotonic()
    got = take(loader, 24)
    if kind == "outage":
        assert store_proxy.triggered_at is not None and time.monotonic() - t0 >= 8.0  # the fault fired and lasted
    else:
        assert store_proxy.refused > 0
    same(got, want)
    assert loader.skipped == {"shards": 0, "samples": 0}


def test_an_outage_longer_than_the_retry_window_stops_with_a_clear_error(remote, store_proxy, monkeypatch):
    monkeypatch.setenv(RETRY_WINDOW_ENV, "3")
    store_proxy.outage(120.0)
    settings = LoaderSettings(num_workers=0, storage_options={"endpoint_url": store_proxy.url})
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable, match=r"retry window|unreachable") as err:
        take(ShardLoader(remote, settings, micro_batch_size=2, seed=4), 4)
    assert "s3://" in str(err.value) and time.monotonic() - t0 < 100
