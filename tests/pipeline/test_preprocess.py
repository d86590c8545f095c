"""The preprocessing job end to end: real Ray, real files in the published layouts, real S3 (moto)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import webdataset as wds
import xarray as xr
import zarr

from conftest import ROOT, S3_ENV, fresh_s3fs, live_session_members, run_module
from pipeline import synthetic
# Expected band orders, resolutions and class names: the published literals the generator writes from
# (ESA Sentinel-2 band list; BigEarthNet 19-class nomenclature, Sumbul et al. 2021), not the readers' own.
from pipeline.synthetic.published import BIGEARTHNET_19_CLASSES, S2_L1C_BANDS, S2_L2A_BANDS, S2_RESOLUTION_M

pytestmark = pytest.mark.slow


def preprocess(*args, check=True, env=None):
    return run_module("pipeline.preprocess", "--no-progress", *args, check=check, env=env)


def read_manifest(folder) -> dict:
    return json.loads((Path(folder) / "manifest.json").read_text())


def read_quarantine(folder) -> list[dict]:
    text = (Path(folder) / "quarantine.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line]


def read_shards(folder) -> dict[str, dict]:
    """Every sample of a shard set, read with plain webdataset (no project code)."""
    m = read_manifest(folder)
    urls = [str(Path(folder) / s["name"]) for s in m["shards"]]
    out = {}
    for s in wds.WebDataset(urls, shardshuffle=False).decode():
        assert s["__key__"] not in out, "duplicate key"
        out[s["__key__"]] = s
    assert len(out) == m["totals"]["samples"]
    return out


def open_zip(path):
    return xr.open_zarr(zarr.storage.ZipStore(str(path), mode="r"), consolidated=True, chunks=None)


def check_stats(manifest, samples, nodata_s2):
    """Manifest statistics against numpy over the samples actually written."""
    s1 = np.stack([s["s1.npy"] for s in samples.values()]).astype(np.float64)
    s2 = np.stack([s["s2.npy"] for s in samples.values()]).astype(np.float64)
    for b in range(s1.shape[1]):
        v = s1[:, b][np.isfinite(s1[:, b])]
        np.testing.assert_allclose(manifest["stats"]["s1"]["mean"][b], v.mean(), rtol=1e-9)
        np.testing.assert_allclose(manifest["stats"]["s1"]["std"][b], v.std(), rtol=1e-9)
    for b in range(s2.shape[1]):
        v = s2[:, b][s2[:, b] != nodata_s2]
        assert manifest["stats"]["s2"]["valid_pixels"][b] == v.size
        np.testing.assert_allclose(manifest["stats"]["s2"]["mean"][b], v.mean(), rtol=1e-9)
        np.testing.assert_allclose(manifest["stats"]["s2"]["std"][b], v.std(), rtol=1e-9)


def check_shard_hashes(folder):
    import hashlib

    m = read_manifest(folder)
    for s in m["shards"]:
        data = (Path(folder) / s["name"]).read_bytes()
        assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]


# -- SSL4EO-S12 v1.1 Zarr ------------------------------------------------------------------


@pytest.fixture(scope="module")
def zarr_archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssl4eo_zarr")
    synthetic.make_ssl4eo_zarr(str(root), splits={"train": 2, "val": 1}, samples_per_file=3, size=48, seed=3)
    return root


def test_zarr_all_splits_lossless_with_stats(zarr_archive, tmp_path):
    out = tmp_path / "shards"
    preprocess("--source", "ssl4eo-zarr", "--input", str(zarr_archive), "--output", str(out), "--split", "all",
               "--workers", "2", "--shard-size-mb", "0.3")
    for split, nfiles in (("train", 2), ("val", 1)):
        folder = out / split
        m = read_manifest(folder)
        assert m["split"] == split and m["quarantined"] == 0
        assert m["totals"]["samples"] == nfiles * 3 * 4 == m["totals"]["input_samples"]
        assert m["totals"]["shards"] > 1  # the size cap cut the set into several shards
        assert m["source"]["s2_offset"]["handling"] == "remove"
        assert m["modalities"]["s2"]["bands"] == list(S2_L1C_BANDS)
        assert m["modalities"]["s1"]["dtype"] == "float16" and m["modalities"]["s2"]["dtype"] == "int16"
        check_shard_hashes(folder)
        samples = read_shards(folder)
        # lossless round trip of every array, against the source read independently
        for f1 in sorted((zarr_archive / split / "S1GRD").glob("*.zarr.zip")):
            f2 = zarr_archive / split / "S2L1C" / f1.name
            d1, d2 = open_zip(f1), open_zip(f2)
            for i, sid in enumerate(d2["sample"].values):
                # S1 is stored in product-name order: its acquisition of date rank t, by the date in the product id
                s1_by_date = sorted(range(4), key=lambda k: str(d1["file_id"].values[i, k]).split("_")[4])
                for t in range(4):
                    got = samples[f"{sid}_t{t}"]
                    j = s1_by_date[t]
                    np.testing.assert_array_equal(got["s1.npy"], d1["bands"][i, j].values)
                    assert got["json"]["s1_product"] == str(d1["file_id"].values[i, j])
                    assert 0 < got["json"]["pair_gap_days"] < 3
                    assert got["s1.npy"].dtype == np.float16
                    np.testing.assert_array_equal(got["s2.npy"], d2["bands"][i, t].values - 1000)
                    meta = got["json"]
                    assert meta["sample_id"] == sid and meta["time_index"] == t and meta["split"] == split
                    assert meta["source"] == "ssl4eo-zarr" and meta["s2_bands"] == list(S2_L1C_BANDS)
                    assert meta["lat"] == pytest.approx(float(d2["center_lat"][i]))
                    assert meta["timestamps"]["s2"].startswith(str(d2["time_"].values[i, t])[:10])
        check_stats(m, samples, nodata_s2=-1000)


def test_zarr_keep_offset_and_l2a(zarr_archive, tmp_path):
    out = tmp_path / "l2a"
    preprocess("--source", "ssl4eo-zarr", "--input", str(zarr_archive), "--output", str(out), "--split", "val",
               "--s2-product", "L2A", "--s2-offset", "keep", "--workers", "1")
    m = read_manifest(out)
    assert m["modalities"]["s2"]["bands"] == list(S2_L2A_BANDS) and m["modalities"]["s2"]["nodata"] == 0
    samples = read_shards(out)
    d2 = open_zip(next((zarr_archive / "val" / "S2L2A").glob("*.zarr.zip")))
    sid = str(d2["sample"].values[0])
    np.testing.assert_array_equal(samples[f"{sid}_t1"]["s2.npy"], d2["bands"][0, 1].values)


def test_zarr_corrupt_and_unpaired_files_are_quarantined(tmp_path):
    src = tmp_path / "src"
    inv = synthetic.make_ssl4eo_zarr(str(src), splits={"train": 2}, samples_per_file=3, size=48, seed=3)
    # The expected counts come from the generator's inventory: per file, its locations x 4 seasons.
    per_file = [[f"{sid}_t{t}" for sid in ids for t in range(4)] for ids in inv["splits"]["train"]["samples"]]
    s1_files = sorted((src / "train" / "S1GRD").glob("*.zarr.zip"))
    # truncate the first S1 file: its 3 locations x 4 times are lost, reported against the S1 file
    data = s1_files[0].read_bytes()
    s1_files[0].write_bytes(data[: len(data) // 3])
    # remove the S2 partner of the second file: its samples are lost too, one record each
    (src / "train" / "S2L1C" / s1_files[1].name).unlink()
    out = tmp_path / "out"
    # every input is quarantined: the run fails with the reasons counted, leaves the report and commits nothing
    proc = preprocess("--source", "ssl4eo-zarr", "--input", str(src), "--output", str(out), "--workers", "1",
                      check=False)
    assert proc.returncode == 2
    n0, n1 = len(per_file[0]), len(per_file[1])
    assert n0 + n1 == 24
    assert (f"no sample written: all {n0 + n1} input samples were quarantined "
            f"(missing_partner {n1}, unreadable {n0})") in proc.stderr
    assert not (out / "manifest.json").exists()
    q = read_quarantine(out)
    assert sorted(r["key"] for r in q if r["reason"] == "unreadable") == sorted(per_file[0])
    assert sorted(r["key"] for r in q if r["reason"] == "missing_partner") == sorted(per_file[1])
    assert all(r["url"].endswith(".zarr.zip") for r in q)


# -- SSL4EO-S12 v1 GeoTIFF, through S3 -----------------------------------------------------


def seasons(folder: Path) -> list[Path]:
    """Product folders of a location in date order, as the reader pairs them (the sensing start, the first
    YYYYMMDDTHHMMSS of both product ids: S2 '<start>_<gen>_T<tile>', S1 'S1x_IW_GRDH_1SDV_<start>_...')."""
    return sorted(folder.iterdir(), key=lambda p: (re.search(r"\d{8}T\d{6}", p.name).group(), p.name))


def _corrupt_tiff_archive(root: Path) -> dict:
    """Damage a few files of a generated tree in the ways users meet; return the expected reasons."""
    locs = sorted(p.name for p in (root / "s2c").iterdir())
    # truncated band file
    prod = seasons(root / "s2c" / locs[0])[0]
    b4 = prod / "B4.tif"
    b4.write_bytes(b4.read_bytes()[:200])
    # wrong shape: a 20 m band with the pixel count of a 10 m one on its 20 m grid (twice the footprint)
    prod = seasons(root / "s2c" / locs[0])[1]
    with rasterio.open(prod / "B2.tif") as ds:
        arr = ds.read(1)
    with rasterio.open(prod / "B5.tif") as ds:
        profile = ds.profile
    with rasterio.open(prod / "B5.tif", "w", **{**profile, "width": arr.shape[1], "height": arr.shape[0]}) as ds:
        ds.write(arr, 1)
    # non-finite S1 values
    prod = seasons(root / "s1" / locs[0])[2]
    with rasterio.open(prod / "VV.tif", "r+") as ds:
        a = ds.read(1)
        a[0, :5] = np.nan
        ds.write(a, 1)
    # all no-data S2
    prod = seasons(root / "s2c" / locs[0])[3]
    for f in prod.glob("*.tif"):
        with rasterio.open(f, "r+") as ds:
            ds.write(np.zeros((ds.height, ds.width), ds.dtypes[0]), 1)
    return {"unreadable": 1, "wrong_shape": 1, "non_finite": 1, "all_nodata": 1}


def test_tiff_from_and_to_s3_with_quarantine(tmp_path, s3_bucket):
    root = tmp_path / "tiff"
    synthetic.make_ssl4eo_tiff(str(root), n_locations=5, size=48, seed=5, misaligned=("0000003",),
                               missing_s1=("0000004",))
    expected = _corrupt_tiff_archive(root)
    expected.update(misaligned=4, missing_partner=4)
    fs = fresh_s3fs()
    fs.put(str(root), f"{s3_bucket}/archive", recursive=True)
    out_url = f"{s3_bucket}/shards"
    proc = preprocess("--source", "ssl4eo-tiff", "--input", f"{s3_bucket}/archive", "--output", out_url,
                      "--workers", "2", "--shard-size-mb", "0.5")
    local = tmp_path / "back"
    fresh_s3fs().get(out_url, str(local), recursive=True)
    m, q = read_manifest(local), read_quarantine(local)
    got = {}
    for r in q:
        got[r["reason"]] = got.get(r["reason"], 0) + 1
        assert r["url"].startswith("s3://") and r["sample_id"]
    assert got == expected
    assert m["totals"]["input_samples"] == 5 * 4 == m["totals"]["samples"] + m["quarantined"]
    assert (m["run"]["ray"], m["run"]["cpus"]) == ("embedded", 2)  # an instance of --workers 2 CPUs
    assert m["totals"]["samples"] == 20 - sum(expected.values())
    samples = read_shards(local)
    check_stats(m, samples, nodata_s2=0)
    # lossless: a written sample equals its GeoTIFFs, 20 m / 60 m bands repeated onto the 10 m grid
    key = sorted(samples)[0]
    loc, t = key.split("_t")
    s2_prod = seasons(root / "s2c" / loc)[int(t)]
    s1_prod = seasons(root / "s1" / loc)[int(t)]
    for i, band in enumerate(S2_L1C_BANDS):
        with rasterio.open(s2_prod / f"{band}.tif") as ds:
            f = S2_RESOLUTION_M[band] // 10
            np.testing.assert_array_equal(samples[key]["s2.npy"][i], np.kron(ds.read(1), np.ones((f, f), ds.dtypes[0])))
    with rasterio.open(s1_prod / "VH.tif") as ds:
        np.testing.assert_array_equal(samples[key]["s1.npy"][1], ds.read(1))
    assert samples[key]["json"]["lat"] is not None and samples[key]["json"]["crs"].startswith("EPSG:")
    # botocore's INFO chatter (one line per client, in the driver and every Ray worker) stays out of the log
    assert "Found credentials" not in proc.stderr + proc.stdout
    # the credentials of the environment reach neither outputs nor logs
    secret = S3_ENV["AWS_SECRET_ACCESS_KEY"]
    for text in [(local / "manifest.json").read_text(), (local / "quarantine.jsonl").read_text(), proc.stdout, proc.stderr]:
        assert secret not in text and S3_ENV["AWS_ACCESS_KEY_ID"] not in text


def test_storage_options_secrets_are_redacted(tmp_path, s3_bucket, s3_endpoint):
    root = tmp_path / "tiff"
    synthetic.make_ssl4eo_tiff(str(root), n_locations=1, size=24, seed=1)
    opts = json.dumps({"key": S3_ENV["AWS_ACCESS_KEY_ID"], "secret": "passed-on-the-command-line"})
    out = f"{s3_bucket}/x"
    proc = preprocess("--source", "ssl4eo-tiff", "--input", str(root), "--output", out, "--workers", "1",
                      "--storage-options", opts)
    text = fresh_s3fs().cat_file(f"{out}/manifest.json").decode()
    assert json.loads(text)["totals"]["samples"] == 4
    for t in (text, proc.stdout, proc.stderr):
        assert "passed-on-the-command-line" not in t and S3_ENV["AWS_ACCESS_KEY_ID"] not in t


def test_plan_only_prints_the_plan_and_writes_nothing(tmp_path):
    root = tmp_path / "tiff"
    synthetic.make_ssl4eo_tiff(str(root), n_locations=3, size=24, seed=1, missing_s1=("0000001",))
    out = tmp_path / "shards"
    args = ("--source", "ssl4eo-tiff", "--input", str(root), "--output", str(out), "--workers", "1",
            "--samples-per-shard", "3")
    proc = preprocess(*args, "--plan-only")
    # 2 locations x 4 seasons in shards of 3; the location without S1 is 4 rejections
    assert "[train] plan only: 8 samples in 3 shards, 0 of them complete from an earlier run; rejected while " \
           "listing: 4 missing_partner; nothing written" in proc.stdout
    assert not out.exists()
    preprocess(*args)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    proc = preprocess(*args, "--plan-only")
    assert "8 samples in 3 shards, 3 of them complete from an earlier run" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # no lease, no record, nothing touched


def test_console_script_and_library_log_level(tmp_path, s3_bucket):
    """`fusmae-preprocess` is the installed command; FUSMAE_LIBRARY_LOG_LEVEL lets the libraries' INFO lines back in."""
    root = tmp_path / "tiff"
    synthetic.make_ssl4eo_tiff(str(root), n_locations=1, size=24, seed=1)
    command = Path(sys.executable).with_name("fusmae-preprocess")
    bad = subprocess.run([str(command), "--source", "ssl4eo-tiff", "--input", str(root), "--output", str(tmp_path / "o")],
                         env={**os.environ, "FUSMAE_LIBRARY_LOG_LEVEL": "LOUD"}, capture_output=True, text=True)
    assert bad.returncode == 2 and "FUSMAE_LIBRARY_LOG_LEVEL='LOUD' is not a log level" in bad.stderr
    assert not (tmp_path / "o").exists()
    proc = subprocess.run([str(command), "--no-progress", "--source", "ssl4eo-tiff", "--input", str(root),
                           "--output", f"{s3_bucket}/loud", "--workers", "1"],
                          env={**os.environ, "FUSMAE_LIBRARY_LOG_LEVEL": "INFO"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Found credentials in environment variables" in proc.stderr
    assert json.loads(fresh_s3fs().cat_file(f"{s3_bucket}/loud/manifest.json"))["totals"]["samples"] == 4


# -- BigEarthNet v2 ------------------------------------------------------------------------


def test_bigearthnet_all_splits_with_labels(tmp_path):
    root = tmp_path / "ben"
    synthetic.make_bigearthnet(str(root), n_patches=9, size=24, seed=2)
    import pyarrow.parquet as pq

    meta = pq.read_table(root / "metadata.parquet").to_pylist()
    out = tmp_path / "shards"
    proc = preprocess("--source", "bigearthnet", "--input", str(root), "--output", str(out), "--split", "all",
                      "--workers", "2")
    total = 0
    for split in ("train", "validation", "test"):
        rows = {r["patch_id"]: r for r in meta if r["split"] == split}
        # planned on Ray: every planned sample's item stayed in the object store (pipeline.sources.listing)
        assert f"[{split}] planned {len(rows)} samples" in proc.stdout
        assert f"{len(rows)} samples' items in Ray's object store" in proc.stdout
        m = read_manifest(out / split)
        samples = read_shards(out / split)
        assert set(samples) == set(rows) and m["quarantined"] == 0
        assert m["modalities"]["s2"]["bands"] == list(S2_L2A_BANDS)
        for pid, s in samples.items():
            assert s["json"]["labels"] == [c for c in BIGEARTHNET_19_CLASSES if c in rows[pid]["labels"]]
            assert s["json"]["label_vector"] == [int(c in rows[pid]["labels"]) for c in BIGEARTHNET_19_CLASSES]
            assert s["s1.npy"].shape == (2, 24, 24) and s["s2.npy"].shape == (12, 24, 24)
        total += len(samples)
    assert total == 9


# -- resumability and determinism ----------------------------------------------------------


def _zarr_big(tmp_path_factory):
    root = tmp_path_factory.mktemp("zarr_big")
    synthetic.make_ssl4eo_zarr(str(root), splits={"train": 3}, samples_per_file=4, size=48, seed=9)
    return root


def test_kill_and_rerun_loses_and_duplicates_nothing(tmp_path, tmp_path_factory):
    src = _zarr_big(tmp_path_factory)
    # many small shards, so that the kill lands while most of them are still to be written
    args = ["--source", "ssl4eo-zarr", "--input", str(src), "--samples-per-shard", "1"]
    clean = tmp_path / "clean"
    preprocess(*args, "--output", str(clean), "--workers", "2")

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.preprocess", "--no-progress", *args,
                             "--output", str(out), "--workers", "1"], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / "_progress"
    deadline = time.time() + 300
    while not (progress.exists() and len(list(progress.glob("*.json"))) >= 2):
        assert proc.poll() is None, "job ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Ray's worker processes have process groups of their own, so one may still finish the shard it was
    # writing: count what the killed job left once the last process of its session is gone.
    while live_session_members(proc.pid):
        assert time.time() < deadline
        time.sleep(0.1)
    assert not (out / "manifest.json").exists()
    done_before = len(list(progress.glob("*.json")))

    rerun = preprocess(*args, "--output", str(out), "--workers", "1")
    assert f"reusing {done_before} shards" in rerun.stdout
    m_clean, m_out = read_manifest(clean), read_manifest(out)
    # `run` counts what this execution built: all of it the first time, what the killed run left the second
    shards = m_clean["totals"]["shards"]
    assert (m_clean["run"]["shards_built"], m_clean["run"]["samples_built"]) == (shards, 3 * 4 * 4)
    assert (m_out["run"]["shards_built"], m_out["run"]["samples_built"]) == (shards - done_before, shards - done_before)
    assert f"built {shards - done_before} shards ({shards - done_before} samples)" in rerun.stdout
    for m in (m_clean, m_out):  # at most `workers` tasks at once, inside the shard phase, inside the run
        run = m["run"]
        assert 0 < run["task_seconds"] <= run["workers"] * run["shard_seconds"] + 0.01
        assert 0 < run["plan_seconds"] and run["plan_seconds"] + run["shard_seconds"] <= run["seconds"] + 0.01
    assert m_out["totals"]["samples"] == 3 * 4 * 4 == len(read_shards(out))
    # byte-identical shards and manifest (apart from the `run` section) whatever the worker count and history
    assert m_out["shards"] == m_clean["shards"]
    strip = lambda m: {k: v for k, v in m.items() if k not in ("run", "source")} | {"source": {k: v for k, v in m["source"].items() if k != "input"}}
    assert strip(m_out) == strip(m_clean)
    for s in m_out["shards"]:
        assert (out / s["name"]).read_bytes() == (clean / s["name"]).read_bytes()
    assert not list(out.glob(".*"))  # no half-written file or staging folder left under any name

    # a complete output with the same invocation: exits quickly and says so, touches nothing
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    again = preprocess(*args, "--output", str(out), "--workers", "1")
    assert "nothing to do" in again.stdout
    assert before == {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}

    # different settings into the same output: refused unless --overwrite
    refused = preprocess(*args[:-1], "2", "--output", str(out), "--workers", "1", check=False)
    assert refused.returncode == 2 and "different settings" in refused.stderr


def test_reuse_rejects_a_damaged_shard(tmp_path, zarr_archive):
    args = ["--source", "ssl4eo-zarr", "--input", str(zarr_archive), "--split", "val", "--samples-per-shard", "4"]
    out = tmp_path / "out"
    preprocess(*args, "--output", str(out), "--workers", "1")
    m = read_manifest(out)
    victim = out / m["shards"][0]["name"]
    good = victim.read_bytes()
    victim.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # same size, one bit flipped
    (out / "manifest.json").unlink()  # as if the first run had died before committing
    rerun = preprocess(*args, "--output", str(out), "--workers", "1")
    assert f"reusing {len(m['shards']) - 1} shards" in rerun.stdout
    assert victim.read_bytes() == good


# -- clear errors --------------------------------------------------------------------------


def test_wrong_source_is_a_clear_error(tmp_path):
    proc = preprocess("--source", "sentinel-3", "--input", str(tmp_path), "--output", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "invalid choice: 'sentinel-3'" in proc.stderr and "ssl4eo-zarr" in proc.stderr


@pytest.mark.parametrize("source, hint", [("ssl4eo-zarr", "no SSL4EO-S12 v1.1 Zarr files"), ("ssl4eo-tiff", "s1/"),
                                          ("bigearthnet", "metadata.parquet")])
def test_input_without_recognisable_files(tmp_path, source, hint):
    (tmp_path / "empty" / "junk").mkdir(parents=True)
    (tmp_path / "empty" / "junk" / "readme.txt").write_text("nothing here")
    proc = preprocess("--source", source, "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o"),
                      check=False)
    assert proc.returncode == 2 and hint in proc.stderr
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_missing_input_and_unwritable_output(tmp_path, zarr_archive, s3_endpoint):
    proc = preprocess("--source", "ssl4eo-zarr", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o"),
                      check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    proc = preprocess("--source", "ssl4eo-zarr", "--input", str(zarr_archive), "--output", str(blocker / "sub"),
                      check=False)
    assert proc.returncode == 2 and "not writable" in proc.stderr
    proc = preprocess("--source", "ssl4eo-zarr", "--input", str(zarr_archive), "--output", "s3://no-such-bucket-xyz/o",
                      check=False)
    assert proc.returncode == 2 and "not writable" in proc.stderr
    proc = preprocess("--source", "ssl4eo-zarr", "--input", str(zarr_archive), "--output", str(tmp_path / "o"),
                      "--split", "test", check=False)
    assert proc.returncode == 2 and "split 'test'" in proc.stderr and "train" in proc.stderr
