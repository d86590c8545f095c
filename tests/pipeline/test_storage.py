"""Storage options reach s3fs as given, with botocore's own retries bounded unless the user sets them; the errors
of a transfer cut short are transient, those of the content are not."""

from __future__ import annotations

import http.client
import os
import zipfile

import aiohttp
import botocore.exceptions
import pytest

from pipeline.storage import is_transient, url_to_fs


def test_s3_calls_get_bounded_botocore_retries_unless_the_user_sets_them():
    fs, path = url_to_fs("s3://bucket/set", {"config_kwargs": {"connect_timeout": 7}})
    assert path == "bucket/set"
    # botocore's documented retry settings (docs.aws.amazon.com, "Retries" in the boto3 guide): mode + max_attempts
    assert fs.config_kwargs == {"connect_timeout": 7, "retries": {"mode": "standard", "max_attempts": 3}}
    fs, _ = url_to_fs("s3://bucket/set", {"config_kwargs": {"retries": {"mode": "adaptive", "max_attempts": 10}}})
    assert fs.config_kwargs == {"retries": {"mode": "adaptive", "max_attempts": 10}}
    fs, _ = url_to_fs("memory://set")  # other stores get nothing they do not take
    assert not hasattr(fs, "config_kwargs")


@pytest.mark.parametrize("error, transient", [
    # what s3fs raised when the fault proxy cut a 200 MB ranged GET 0.3 s into its body (moto on loopback)
    (aiohttp.ClientPayloadError("Response payload is not completed: <ContentLengthError: 400, message='Not enough "
                                "data to satisfy content length header (received 95710796 of 209715200 bytes).'>"),
     True),
    (botocore.exceptions.ResponseStreamingError(error="Connection broken"), True),
    (botocore.exceptions.IncompleteReadError(actual_bytes=10, expected_bytes=20), True),
    (http.client.IncompleteRead(b"ab", 10), True),
    (zipfile.BadZipFile("Bad CRC-32 for file 'bands/1.0.0.0.0'"), False),  # the object itself: skip and count
    (EOFError(), False),
])
def test_a_transfer_cut_short_is_transient_and_damaged_content_is_not(error, transient):
    assert is_transient(error) is transient


def test_a_range_past_the_end_reads_as_no_bytes_and_other_errors_stay(s3_bucket, tmp_path):
    """`read_range` reads as a local file does: fewer bytes where the object ends first, none where it ends before
    the range begins (S3's 416 InvalidRange); any other error (a missing object) is raised as before."""
    from conftest import fresh_s3fs

    from pipeline.storage import read_range

    s3 = fresh_s3fs()
    s3.pipe_file(f"{s3_bucket}/ten", bytes(range(10)))
    (tmp_path / "ten").write_bytes(bytes(range(10)))
    local, _ = url_to_fs(str(tmp_path))
    for fs, path in ((s3, f"{s3_bucket}/ten"), (local, str(tmp_path / "ten"))):
        assert read_range(fs, path, 2, 5) == bytes([2, 3, 4])
        assert read_range(fs, path, 8, 20) == bytes([8, 9])
        assert read_range(fs, path, 10, 20) == read_range(fs, path, 15, 20) == b""
    with pytest.raises(FileNotFoundError):
        read_range(s3, f"{s3_bucket}/missing", 0, 5)


def test_uploads_to_s3_go_in_parts_of_8_mib_and_elsewhere_as_the_store_likes(s3_bucket, tmp_path):
    """`put_atomic` uploads to S3 in parts of `UPLOAD_PART_BYTES` (s3fs's 50 MiB parts, 10 read at once, held ~1 GiB
    for a 512 MiB shard): a multipart object's ETag ends in its part count. Past S3's 10,000 parts the parts grow;
    how many go at once stays s3fs's setting (or the user's); other stores get no S3 options."""
    import boto3
    import fsspec
    from conftest import fresh_s3fs

    from pipeline.storage import MAX_UPLOAD_PARTS, UPLOAD_PART_BYTES, put_atomic, upload_options

    data = os.urandom(2 * UPLOAD_PART_BYTES + 12345)
    (tmp_path / "shard.tar").write_bytes(data)
    s3 = fresh_s3fs()
    put_atomic(s3, str(tmp_path / "shard.tar"), f"{s3_bucket}/shards/shard.tar")
    assert s3.cat_file(f"{s3_bucket}/shards/shard.tar") == data
    head = boto3.client("s3").head_object(Bucket=s3_bucket.removeprefix("s3://"), Key="shards/shard.tar")
    assert head["ETag"].strip('"').endswith("-3")  # 8 MiB, 8 MiB and the rest
    huge = 100 * MAX_UPLOAD_PARTS * UPLOAD_PART_BYTES
    assert upload_options(s3, huge)["chunksize"] * MAX_UPLOAD_PARTS >= huge
    assert upload_options(s3, len(data)) == {"chunksize": UPLOAD_PART_BYTES}  # parts in flight: s3fs's or the user's
    memory = fsspec.filesystem("memory")
    assert upload_options(memory, len(data)) == {}
    put_atomic(memory, str(tmp_path / "shard.tar"), "/out/shard.tar")
    assert memory.cat_file("/out/shard.tar") == data
