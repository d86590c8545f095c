"""Credentials given in --storage-options are the ones used: against an S3 endpoint that checks them.

The suite's shared endpoint accepts any credentials, so a test there passes even if the options were
never applied. Here a second moto server enforces authentication (``INITIAL_NO_AUTH_ACTION_COUNT``:
after the requests that create an IAM user, its access key, its policy and the bucket, every request
must be signed with a key that user holds). The environment carries the suite's loopback credentials,
which this server refuses: only the options' key can succeed.
"""

from __future__ import annotations

import json
import os
import sys

import boto3
import pytest
import s3fs

from conftest import S3_ENV, run_module
from launch.demo import local_s3
from pipeline import synthetic

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def auth_s3(tmp_path_factory):
    """(endpoint URL, access key id, secret) of a server that checks signatures; bucket 'auth' exists."""
    proc, url = local_s3.start(tmp_path_factory.mktemp("moto_auth") / "moto.log",
                               env={"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        kw = dict(endpoint_url=url, region_name="us-east-1", aws_access_key_id="bootstrap",
                  aws_secret_access_key="bootstrap")
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="fusmae")
        key = iam.create_access_key(UserName="fusmae")["AccessKey"]
        iam.put_user_policy(UserName="fusmae", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        boto3.client("s3", **kw).create_bucket(Bucket="auth")
        yield url, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        local_s3.stop(proc)


def test_the_endpoint_refuses_the_environment_credentials(auth_s3):
    url, _, _ = auth_s3
    fs = s3fs.S3FileSystem(key=S3_ENV["AWS_ACCESS_KEY_ID"], secret=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": url}, skip_instance_cache=True)
    with pytest.raises(PermissionError):
        fs.pipe("auth/probe", b"x")


def test_preprocess_uses_the_storage_options_credentials(auth_s3, tmp_path):
    url, key_id, secret = auth_s3
    archive = tmp_path / "tiff"
    synthetic.make_ssl4eo_tiff(str(archive), n_locations=1, size=24, seed=2)
    env = {**S3_ENV, "AWS_ENDPOINT_URL": url}  # the environment's credentials are wrong for this server

    def preprocess(options: dict, out: str):
        return run_module("pipeline.preprocess", "--no-progress", "--source", "ssl4eo-tiff", "--input", str(archive),
                          "--output", out, "--workers", "1", "--storage-options", json.dumps(options),
                          env=env, check=False, timeout=600)

    wrong = preprocess({"key": key_id, "secret": "not-the-secret"}, "s3://auth/wrong")
    assert wrong.returncode == 2
    assert "output location is not writable: s3://auth/wrong" in wrong.stderr and "check the credentials" in wrong.stderr
    assert "not-the-secret" not in wrong.stdout + wrong.stderr

    right = preprocess({"key": key_id, "secret": secret}, "s3://auth/shards")
    assert right.returncode == 0, right.stderr[-3000:]
    fs = s3fs.S3FileSystem(key=key_id, secret=secret, client_kwargs={"endpoint_url": url}, skip_instance_cache=True)
    manifest = json.loads(fs.cat_file("auth/shards/manifest.json"))
    assert manifest["totals"]["samples"] == 4
    assert not fs.exists("auth/wrong")
    for text in (json.dumps(manifest), right.stdout, right.stderr):
        assert secret not in text and key_id not in text
