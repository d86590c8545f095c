"""The preprocessing job's typed settings: validation, the content that identifies a job, and the CLI parser."""

from __future__ import annotations

import dataclasses

import pytest

import pipeline
from pipeline.job import PreprocessError, PreprocessSettings, default_workers
from pipeline.preprocess import parse_args
from pipeline.sources import SourceOptions

REQUIRED = ("--source", "ssl4eo-zarr", "--input", "/data/in", "--output", "/data/out")


def settings(**kw) -> PreprocessSettings:
    return PreprocessSettings(**{"source": "ssl4eo-zarr", "input": "/data/in", "output": "/data/out", **kw})


def test_defaults():
    s = settings()
    assert (s.split, s.shard_size_mb, s.samples_per_shard, s.s2_product, s.s2_offset) == ("train", 512.0, 100_000,
                                                                                             "L1C", "remove")
    assert (s.max_nonfinite_fraction, s.storage_options, s.verify_existing) == (0.0, {}, "sha256")
    assert (s.overwrite, s.ray_address, s.progress) == (False, None, True)
    assert 1 <= s.workers <= 8
    assert s.shard_bytes == 536_870_912
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.workers = 3  # type: ignore[misc]


@pytest.mark.parametrize("field, value, message", [
    ("workers", 0, "--workers must be >= 1"),
    ("workers", -3, "--workers must be >= 1"),
    ("workers", 2.5, "--workers must be an integer"),
    ("workers", True, "--workers must be an integer"),
    ("shard_size_mb", 0, "--shard-size-mb must be > 0"),
    ("shard_size_mb", -1.5, "--shard-size-mb must be > 0"),
    ("shard_size_mb", "512", "--shard-size-mb must be a number"),
    ("samples_per_shard", 0, "--samples-per-shard must be >= 1"),
    ("samples_per_shard", "10", "--samples-per-shard must be an integer"),
    ("max_nonfinite_fraction", 1.5, "--max-nonfinite-fraction must be in [0, 1]"),
    ("max_nonfinite_fraction", -0.1, "--max-nonfinite-fraction must be in [0, 1]"),
    ("max_nonfinite_fraction", float("nan"), "--max-nonfinite-fraction must be in [0, 1]"),
    ("storage_options", '{"anon": true}', "--storage-options must be a JSON object"),
    ("storage_options", ["anon"], "--storage-options must be a JSON object"),
    ("source", "sentinel-3",
     "--source must be one of bigearthnet, sen12ms, ssl4eo-tiff, ssl4eo-wds, ssl4eo-zarr, terramesh"),
    ("s2_product", "L3", "--s2-product must be one of L1C, L2A"),
    ("s2_offset", "drop", "--s2-offset must be one of remove, keep"),
    ("verify_existing", "md5", "--verify-existing must be one of sha256, size"),
    ("input", "", "--input must not be empty"),
    ("output", "", "--output must not be empty"),
    ("split", "", "--split must not be empty"),
    ("input", None, "--input must be a string"),
    ("read_ahead", -1, "--read-ahead must be between 0 and 64 locations, got -1"),
    ("read_ahead", 65, "--read-ahead must be between 0 and 64 locations, got 65"),
    ("read_ahead", 2.0, "--read-ahead must be an integer"),
])
def test_each_bad_value_is_an_error_naming_its_option(field, value, message):
    with pytest.raises(PreprocessError) as err:
        settings(**{field: value})
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_boundary_values_are_accepted():
    s = settings(workers=1, samples_per_shard=1, shard_size_mb=0.001, max_nonfinite_fraction=1.0)
    assert (s.workers, s.samples_per_shard, s.max_nonfinite_fraction) == (1, 1, 1.0)
    assert settings(max_nonfinite_fraction=0, shard_size_mb=2).shard_bytes == 2_097_152  # ints pass as numbers


def test_content_names_what_decides_the_shards_and_nothing_else():
    s = settings(input="s3://bucket/archive/", shard_size_mb=0.5, samples_per_shard=7, s2_product="L2A",
                 s2_offset="keep", max_nonfinite_fraction=0.25)
    assert s.content("val") == {
        "source": "ssl4eo-zarr", "input": "s3://bucket/archive", "split": "val", "shard_size_mb": 0.5,
        "samples_per_shard": 7, "s2_product": "L2A", "s2_offset": "keep", "max_nonfinite_fraction": 0.25,
        "max_pair_gap_days": 45.0, "format_version": 1, "pipeline_version": pipeline.__version__,
    }
    # how the job runs is not what it makes: same identity
    same = dataclasses.replace(s, workers=3, output="/elsewhere", storage_options={"anon": True}, overwrite=True,
                               progress=False, verify_existing="size", ray_address="auto", force=True,
                               retry_window_s=60.0, read_ahead=0)
    assert same.job_fingerprint("val") == s.job_fingerprint("val")
    assert len(s.job_fingerprint("val")) == 64
    assert dataclasses.replace(s, samples_per_shard=8).job_fingerprint("val") != s.job_fingerprint("val")
    assert s.job_fingerprint("train") != s.job_fingerprint("val")


def test_source_options_and_spec():
    opts = {"anon": True}
    s = settings(s2_product="L2A", s2_offset="keep", max_nonfinite_fraction=0.25, storage_options=opts)
    assert s.source_options() == SourceOptions("L2A", "keep", 0.25, {"anon": True})
    assert s.source_options().read_ahead == 4 and settings(read_ahead=16).source_options().read_ahead == 16
    assert s.source_options().storage_options is not opts  # a worker's copy, not the settings' own dict
    spec = s.source_spec()
    assert (spec.name, spec.input_url, spec.options) == ("ssl4eo-zarr", "/data/in", s.source_options())


def test_repr_hides_credentials():
    s = settings(input="s3://bucket/in", storage_options={"key": "AKIAX", "secret": "zz", "anon": False})
    text = repr(s)
    assert "AKIAX" not in text and "'zz'" not in text
    assert "'anon': False" in text and "workers=" in text


@pytest.mark.parametrize("option", ["input", "output"])
def test_credentials_inside_urls_are_refused_and_shown_redacted(option):
    with pytest.raises(PreprocessError, match=rf"--{option} s3://\*\*\*@bucket/x: credentials inside a URL") as err:
        settings(**{option: "s3://AKIAX:pw-zz@bucket/x"})
    assert "AKIAX" not in str(err.value) and "pw-zz" not in str(err.value)


def test_parse_args_defaults_are_the_settings_defaults():
    assert parse_args(list(REQUIRED)) == PreprocessSettings("ssl4eo-zarr", "/data/in", "/data/out",
                                                            workers=default_workers())


def test_parse_args_every_flag():
    s = parse_args([*REQUIRED, "--split", "all", "--workers", "3", "--shard-size-mb", "0.5", "--samples-per-shard", "9",
                    "--s2-product", "L2A", "--s2-offset", "keep", "--max-nonfinite-fraction", "0.1",
                    "--storage-options", '{"anon": false, "client_kwargs": {"region_name": "x"}}',
                    "--verify-existing", "size", "--overwrite", "--ray-address", "auto", "--no-progress",
                    "--read-ahead", "12"])
    assert s == PreprocessSettings(
        source="ssl4eo-zarr", input="/data/in", output="/data/out", split="all", workers=3, shard_size_mb=0.5,
        samples_per_shard=9, s2_product="L2A", s2_offset="keep", max_nonfinite_fraction=0.1,
        storage_options={"anon": False, "client_kwargs": {"region_name": "x"}}, verify_existing="size",
        overwrite=True, ray_address="auto", progress=False, read_ahead=12,
    )


@pytest.mark.parametrize("extra, message", [
    (["--workers", "0"], "--workers must be >= 1"),
    (["--shard-size-mb", "0"], "--shard-size-mb must be > 0"),
    (["--samples-per-shard", "0"], "--samples-per-shard must be >= 1"),
    (["--max-nonfinite-fraction", "2"], "--max-nonfinite-fraction must be in [0, 1]"),
    (["--storage-options", "[1]"], "--storage-options must be a JSON object, e.g. '{\"anon\": false}'"),
    (["--storage-options", "{x"], "--storage-options must be a JSON object, e.g. '{\"anon\": false}'"),
    (["--workers", "two"], "argument --workers: invalid int value: 'two'"),
    (["--s2-product", "L3"], "argument --s2-product: invalid choice: 'L3'"),
    (["--read-ahead", "-2"], "--read-ahead must be between 0 and 64 locations, got -2"),
])
def test_parse_args_errors_exit_2_with_usage(extra, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args([*REQUIRED, *extra])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m pipeline.preprocess") and message in err
