"""Storage options reach s3fs as given, with botocore's own retries bounded unless the user sets them."""

from __future__ import annotations

from pipeline.storage import url_to_fs


def test_s3_calls_get_bounded_botocore_retries_unless_the_user_sets_them():
    fs, path = url_to_fs("s3://bucket/set", {"config_kwargs": {"connect_timeout": 7}})
    assert path == "bucket/set"
    # botocore's documented retry settings (docs.aws.amazon.com, "Retries" in the boto3 guide): mode + max_attempts
    assert fs.config_kwargs == {"connect_timeout": 7, "retries": {"mode": "standard", "max_attempts": 3}}
    fs, _ = url_to_fs("s3://bucket/set", {"config_kwargs": {"retries": {"mode": "adaptive", "max_attempts": 10}}})
    assert fs.config_kwargs == {"retries": {"mode": "adaptive", "max_attempts": 10}}
    fs, _ = url_to_fs("memory://set")  # other stores get nothing they do not take
    assert not hasattr(fs, "config_kwargs")
