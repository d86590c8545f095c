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
    in_flight, most, lock, calls = [0], [0], threading.Lock(), []
    read_range = reader.read_range

    def counted(*args):
        calls.append(args[2])
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

    # the same size, other bytes: not kept; a byte short or a byte more: not even read
    other = bytearray(data)
    other[2500] ^= 1
    s3.pipe_file(f"{s3_bucket}/s/b.tar", bytes(other))
    problem = reader.download_verified(s3, f"{s3_bucket}/s/b.tar", _shard("b.tar", data), str(tmp_path / "b.tar"),
                                       block=1000)
    assert problem is not None and "sha256" in problem and "the manifest says" in problem
    for name, stored in (("c.tar", data[:-1]), ("d.tar", data + b"\0")):
        s3.pipe_file(f"{s3_bucket}/s/{name}", stored)
        requests = len(calls)
        assert reader.download_verified(s3, f"{s3_bucket}/s/{name}", _shard(name, data), str(tmp_path / name),
                                        block=1000) == f"{len(stored)} bytes, the manifest says {len(data)} bytes"
        assert len(calls) == requests  # no range read
    assert [p.name for p in tmp_path.iterdir()] == ["a.tar"]


def test_a_transient_error_in_the_middle_restarts_the_copy_and_leaves_nothing_behind(s3_bucket, tmp_path,
                                                                                      monkeypatch):
    """A block whose request fails (a connection reset) fails the copy; the loader's retry (`retrying`, as
    `ShardReader._download` calls it) makes it again, and the temporary file of the failed one is gone."""
    from pipeline.storage import retrying

    s3 = fresh_s3fs()
    data = os.urandom(4 * 1000)
    s3.pipe_file(f"{s3_bucket}/s/a.tar", data)
    read_range, failed = reader.read_range, []

    def once(fs, path, start, end):
        if start == 2000 and not failed:
            failed.append(start)
            raise ConnectionResetError("connection reset by peer")
        return read_range(fs, path, start, end)

    monkeypatch.setattr(reader, "read_range", once)
    dest = tmp_path / "a.tar"
    assert retrying(reader.download_verified)(s3, f"{s3_bucket}/s/a.tar", _shard("a.tar", data), str(dest),
                                              block=1000, streams=2) is None
    assert failed == [2000] and dest.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["a.tar"]
