"""S1 and S2 acquisitions paired by date, not by index (SSL4EO-S12 v1.1 stores S1 in product-name order).

Expected pairs come from the generator's inventory (``s1_order``) and the files' own product ids,
read here with xarray; gaps from those product ids with numpy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import xarray as xr
import zarr

from conftest import run_module
from pipeline import synthetic
from pipeline.job import PreprocessError, PreprocessSettings
from pipeline.preprocess import parse_args, run_job
from pipeline.sources import SOURCES, SourceOptions
from pipeline.sources.base import pair_by_date

SHUFFLE = (2, 0, 3, 1)  # date rank of the S1 acquisition stored at each time index


def _open(path) -> xr.Dataset:
    return xr.open_zarr(zarr.storage.ZipStore(str(path), mode="r"), consolidated=True, chunks=None)


def _stamp(product_id: str, s1: bool) -> np.datetime64:
    """Acquisition start in a product id: S1 field 5 (S1A_IW_GRDH_1SDV_<start>_...), S2 field 1."""
    s = product_id.split("_")[4 if s1 else 0]
    return np.datetime64(f"{s[:4]}-{s[4:6]}-{s[6:8]}T{s[9:11]}:{s[11:13]}:{s[13:15]}")


def _inline(fn, args):
    return [fn(a) for a in args]


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory):
    root = tmp_path_factory.mktemp("shuffled")
    out = synthetic.make_ssl4eo_zarr(root, splits={"train": 1}, samples_per_file=2, size=24, seed=7,
                                     products=("S1GRD", "S2L1C"), s1_order=SHUFFLE)
    return root, out


def test_pair_by_date_matches_sorted_to_sorted():
    s1 = ["2020-08-08T17:40:06Z", "2020-05-10T17:40:31Z", "2021-02-10T17:40:36Z", "2020-11-09T06:06:46Z"]
    s2 = ["2020-05-09T10:00:00Z", "2020-08-09T10:00:00Z", "2020-11-10T10:00:00Z", "2021-02-08T10:00:00Z"]
    pairs = pair_by_date(s1, s2)
    assert [(p.rank, p.s1, p.s2) for p in pairs] == [(0, 1, 0), (1, 0, 1), (2, 3, 2), (3, 2, 3)]
    assert [p.gap_days for p in pairs] == [1.3198, 0.6805, 1.162, 2.3199]


def test_pair_by_date_surplus_and_undated():
    pairs = pair_by_date(["2020-01-02T00:00:00Z"], ["2020-03-01T00:00:00Z", "2020-01-01T00:00:00Z"])
    assert [(p.rank, p.s1, p.s2, p.gap_days) for p in pairs] == [(0, 0, 1, 1.0), (1, None, 0, None)]
    # any undated acquisition: stored order, no gap
    pairs = pair_by_date([None, "2020-01-01T00:00:00Z"], ["2020-02-01T00:00:00Z", "2020-01-01T00:00:00Z"])
    assert [(p.s1, p.s2, p.gap_days) for p in pairs] == [(0, 0, None), (1, 1, 0.0)]


def test_shuffled_s1_is_paired_by_date(shuffled):
    root, out = shuffled
    assert all(order == list(SHUFFLE) for order in out["s1_order"].values())
    source = SOURCES["ssl4eo-zarr"](str(root), SourceOptions())
    items, rejects = source.plan("train", _inline)
    assert rejects == [] and len(items) == 2 * 4
    samples = {s.key: s for s in source.read(items, "train")}
    d1 = _open(out["splits"]["train"]["files"]["S1GRD"][0])
    d2 = _open(out["splits"]["train"]["files"]["S2L1C"][0])
    for i, sid in enumerate(out["splits"]["train"]["samples"][0]):
        for t in range(4):
            j = SHUFFLE.index(t)  # the stored index of the S1 acquisition of date rank t
            got = samples[f"{sid}_t{t}"]
            np.testing.assert_array_equal(got.s1, d1["bands"].values[i, j])
            np.testing.assert_array_equal(got.s2, d2["bands"].values[i, t] - 1000)
            s1_id, s2_id = str(d1["file_id"].values[i, j]), str(d2["file_id"].values[i, t])
            assert (got.meta["s1_product"], got.meta["s2_product"]) == (s1_id, s2_id)
            t1, t2 = _stamp(s1_id, s1=True), _stamp(s2_id, s1=False)
            # metadata agree with themselves: the timestamp is the product's, in the S2's season
            assert got.meta["timestamps"]["s1"] == f"{t1}Z" and got.meta["timestamps"]["s2"] == f"{t2}Z"
            gap = abs(int((t1 - t2) / np.timedelta64(1, "s"))) / 86400
            assert got.meta["pair_gap_days"] == pytest.approx(gap, abs=1e-4) and gap < 3
            assert got.meta["time_index"] == t
    assert "by acquisition date" in source.describe()["pairing"] and source.describe()["max_pair_gap_days"] == 45.0


@pytest.mark.slow
def test_temporal_mismatch_is_quarantined_end_to_end(shuffled, tmp_path):
    root, out = shuffled
    d1 = _open(out["splits"]["train"]["files"]["S1GRD"][0])
    d2 = _open(out["splits"]["train"]["files"]["S2L1C"][0])
    limit = 1.5
    gaps = {}
    for i, sid in enumerate(out["splits"]["train"]["samples"][0]):
        for t in range(4):
            t1 = _stamp(str(d1["file_id"].values[i, SHUFFLE.index(t)]), s1=True)
            t2 = _stamp(str(d2["file_id"].values[i, t]), s1=False)
            gaps[f"{sid}_t{t}"] = abs(int((t1 - t2) / np.timedelta64(1, "s"))) / 86400
    far = {k for k, g in gaps.items() if g > limit}
    assert far and len(far) < len(gaps), gaps  # the seed exercises both sides of the limit
    dest = tmp_path / "shards"
    run_module("pipeline.preprocess", "--no-progress", "--source", "ssl4eo-zarr", "--input", str(root),
               "--output", str(dest), "--workers", "1", "--max-pair-gap-days", str(limit))
    manifest = json.loads((dest / "manifest.json").read_text())
    quarantine = [json.loads(line) for line in (dest / "quarantine.jsonl").read_text().splitlines()]
    assert {q["key"] for q in quarantine} == far and {q["reason"] for q in quarantine} == {"temporal_mismatch"}
    assert all(q["url"].endswith(".zarr.zip") and "S1GRD" in q["url"] for q in quarantine)
    assert manifest["totals"]["input_samples"] == 8 == manifest["totals"]["samples"] + manifest["quarantined"]
    assert manifest["settings"]["max_pair_gap_days"] == limit and manifest["source"]["max_pair_gap_days"] == limit
    urls = [str(dest / s["name"]) for s in manifest["shards"]]
    written = {s["__key__"]: s["json"] for s in wds.WebDataset(urls, shardshuffle=False).decode()}
    assert set(written) == set(gaps) - far
    for key, meta in written.items():
        assert meta["pair_gap_days"] == pytest.approx(gaps[key], abs=1e-4) and meta["pair_gap_days"] <= limit


# -- the product folder the job needs --------------------------------------------------------------


def test_missing_s2_product_names_what_was_found(shuffled, tmp_path, capsys):
    root, _ = shuffled  # holds S1GRD/ and S2L1C/ only
    settings = PreprocessSettings(source="ssl4eo-zarr", input=str(root), output=str(tmp_path / "o"),
                                  s2_product="L2A", workers=1)
    assert run_job(settings) == 2  # before Ray starts: nothing is planned or written
    err = capsys.readouterr().err
    assert f"no S2L2A/ in {root}; found S1GRD/, S2L1C/: pass --s2-product L1C" in err
    assert not (tmp_path / "o").exists()


def test_missing_s1_product_is_an_error(shuffled, tmp_path, capsys):
    root, _ = shuffled
    src = tmp_path / "only_s2"
    shutil.copytree(Path(root) / "train" / "S2L1C", src / "train" / "S2L1C")
    settings = PreprocessSettings(source="ssl4eo-zarr", input=str(src), output=str(tmp_path / "o"), workers=1)
    assert run_job(settings) == 2
    assert f"no S1GRD/ in {src}; found S2L1C/" in capsys.readouterr().err


def test_missing_tiff_product_names_the_other_level(tmp_path, capsys):
    root = tmp_path / "tiff"
    synthetic.make_ssl4eo_tiff(root, n_locations=1, size=12, seed=1)
    settings = PreprocessSettings(source="ssl4eo-tiff", input=str(root), output=str(tmp_path / "o"),
                                  s2_product="L2A", workers=1)
    assert run_job(settings) == 2
    assert "no 's2a/' folder" in (err := capsys.readouterr().err) and "found s2c/: pass --s2-product L1C" in err


# -- the setting -----------------------------------------------------------------------------------


def test_max_pair_gap_days_setting():
    base = ["--source", "ssl4eo-zarr", "--input", "/in", "--output", "/out"]
    assert parse_args(base).max_pair_gap_days == 45.0
    s = parse_args([*base, "--max-pair-gap-days", "10"])
    assert s.max_pair_gap_days == 10.0 and s.source_options().max_pair_gap_days == 10.0
    assert s.content("train")["max_pair_gap_days"] == 10.0
    assert s.job_fingerprint("train") != parse_args(base).job_fingerprint("train")
    for bad in (0, -1.0, float("inf"), float("nan")):
        with pytest.raises(PreprocessError, match="--max-pair-gap-days must be a finite number > 0"):
            PreprocessSettings(source="ssl4eo-zarr", input="/in", output="/out", max_pair_gap_days=bad)
    with pytest.raises(PreprocessError, match="--max-pair-gap-days must be a number"):
        PreprocessSettings(source="ssl4eo-zarr", input="/in", output="/out", max_pair_gap_days="45")
