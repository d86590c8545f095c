"""``--max-nonfinite-fraction``: a sample with fewer non-finite pixels than the limit is written as stored, its
non-finite pixels left out of the statistics; one with more is quarantined as ``non_finite``.

The synthetic WebDataset release's ``non_finite`` defect sets one row of S1 VV at time 0 to NaN: at 24 px that
is 24 of the 2 x 24 x 24 S1 values, 2.08 %. Limits on both sides of it are run through the shard task itself
(`pipeline.workers.build_shard`, in this process), and the shard is read back with tarfile and numpy.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from pipeline import synthetic
from pipeline.job import SourceSpec
from pipeline.plan import ShardTask
from pipeline.sources import SourceOptions
from pipeline.stats import BandMoments
from pipeline.workers import build_shard

SIZE = 24
FRACTION = SIZE / (2 * SIZE * SIZE)  # one row of one of the two S1 bands


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    inventory = synthetic.make_ssl4eo_wds(str(root), splits={"train": 1}, samples_per_shard=2, size=SIZE, seed=9,
                                          defects=["non_finite"])
    (location,) = inventory["defects"]
    return str(root), f"{location}_t0"  # time 0 carries the NaN row


def _shard(archive, tmp_path, limit: float):
    """(record, {key: (s1, s2)} read back from the tar) of one shard task over the whole archive."""
    root, _ = archive
    spec = SourceSpec("ssl4eo-wds", root, SourceOptions(max_nonfinite_fraction=limit))
    source = spec.build()
    items, rejects = source.plan("train", lambda fn, args: [fn(a) for a in args])
    assert rejects == [] and len(items) == 2 * 4
    out = tmp_path / f"limit-{limit}"
    out.mkdir()
    record = build_shard(spec, "train", ShardTask(0, "train-000000.tar", list(items), "f"), str(out), {})
    arrays: dict = {}
    with tarfile.open(out / "train-000000.tar") as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            if ext.endswith("npy"):
                arrays.setdefault(key, {})[ext] = np.load(io.BytesIO(tar.extractfile(m).read()))
    return record, {k: (v["s1.npy"], v["s2.npy"]) for k, v in arrays.items()}


@pytest.mark.parametrize("limit", [0.0, round(FRACTION - 0.0005, 4)])
def test_a_sample_over_the_limit_is_quarantined(archive, tmp_path, limit):
    record, arrays = _shard(archive, tmp_path, limit)
    (rejection,) = record["rejections"]
    assert rejection["key"] == archive[1] and rejection["reason"] == "non_finite"
    assert f"{FRACTION:.2%} non-finite pixels (limit {limit:.2%})" in rejection["detail"]
    assert archive[1] not in arrays and len(arrays) == 7
    assert all(np.isfinite(s1).all() for s1, _ in arrays.values())


def test_a_sample_under_the_limit_is_written_as_stored_and_left_out_of_the_statistics(archive, tmp_path):
    record, arrays = _shard(archive, tmp_path, round(FRACTION + 0.0005, 4))
    assert record["rejections"] == [] and record["samples"] == 8 and len(arrays) == 8
    s1 = arrays[archive[1]][0]
    assert np.isnan(s1[0, 0]).all() and np.count_nonzero(~np.isfinite(s1)) == SIZE  # the row, as stored
    # per-band S1 statistics over the finite pixels only: numpy in float64 over what the shard holds
    stacked = np.stack([a[0] for a in arrays.values()]).astype(np.float64)  # (N, 2, H, W)
    moments = BandMoments.from_dict(record["stats"]["s1"])
    for band in range(2):
        values = stacked[:, band][np.isfinite(stacked[:, band])]
        assert moments.count[band] == values.size == 8 * SIZE * SIZE - (SIZE if band == 0 else 0)
        assert moments.mean[band] == pytest.approx(values.mean(), rel=1e-12)
        assert moments.m2[band] == pytest.approx(((values - values.mean()) ** 2).sum(), rel=1e-9)
    assert json.dumps(record["stats"], allow_nan=False)  # nothing non-finite reaches the manifest
