"""`launch.data.reader.download_verified`: a shard copied into the node cache by ranged reads several at a time,
written and hashed in order, kept only when its size and sha256 are the manifest's (on the moto S3 server)."""

from __future__ import annotations

import hashlib
import os
import threading
import time

from conftest import fresh_s3fs

from launch.data import reader
from pipeline.manifest import ShardInfo


def _shard(name: str, data: bytes) -> ShardInfo:
    return ShardInfo(name, name, 1, len(data), hashlib.sha256(data).hexdigest())


def test_a_shard_is_fetched_by_blocks_in_parallel_and_kept_only_if_it_checks_out(s3_bucket, tmp_path, monkeypatch):
    s3 = fresh_s3fs()
    data = os.urandom(5 * 1000 + 123)  # five whole blocks of 1000 bytes and a short one
    s3.pipe_file(f"{s3_bucket}/s/a.tar", data)
    in_flight, most, lock = [0], [0], threading.Lock()
    read_range = reader.read_range

    def counted(*args):
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        time.sleep(0.05)  # long enough for the other requests to be sent meanwhile
        try:
            return read_range(*args)
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(reader, "read_range", counted)
    dest = tmp_path / "a.tar"
    assert reader.download_verified(s3, f"{s3_bucket}/s/a.tar", _shard("a.tar", data), str(dest), block=1000,
                                    streams=3) is None
    assert dest.read_bytes() == data and most[0] == 3  # three requests at a time, the blocks in order
    assert [p.name for p in tmp_path.iterdir()] == ["a.tar"]  # no temporary file left

    # the same size, other bytes: not kept; another size: not even read
    other = bytearray(data)
    other[2500] ^= 1
    s3.pipe_file(f"{s3_bucket}/s/b.tar", bytes(other))
    s3.pipe_file(f"{s3_bucket}/s/c.tar", data[:-1])
    problem = reader.download_verified(s3, f"{s3_bucket}/s/b.tar", _shard("b.tar", data), str(tmp_path / "b.tar"),
                                       block=1000)
    assert problem is not None and "sha256" in problem and "the manifest says" in problem
    assert reader.download_verified(s3, f"{s3_bucket}/s/c.tar", _shard("c.tar", data), str(tmp_path / "c.tar"),
                                    block=1000) == f"{len(data) - 1} bytes, the manifest says {len(data)} bytes"
    assert [p.name for p in tmp_path.iterdir()] == ["a.tar"]
