"""The synthetic archives read back with the real readers, in the published layouts.

Every check re-opens the files (xarray/zarr for the zip stores, rasterio for the
GeoTIFFs, pyarrow for the parquet) rather than trusting the writer's return value.
Sizes are small (48-120 px) to keep the module well under the suite's time budget.
"""

from __future__ import annotations

import filecmp
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
import xarray as xr
import zarr

from pipeline import synthetic as syn

REPO = Path(__file__).resolve().parents[2]
S1_ID = re.compile(r"^S1[AB]_IW_GRDH_1SDV_(\d{8})T\d{6}_\d{8}T\d{6}_\d{6}_[0-9A-F]{6}_[0-9A-F]{4}$")
S2_ID = re.compile(r"^(\d{8})T\d{6}_\d{8}T\d{6}_T\d{2}[C-X][A-Z]{2}$")
UTM = re.compile(r"^EPSG:32[67]\d{2}$")


def _open_zip(path):
    return xr.open_zarr(zarr.storage.ZipStore(path, mode="r"), consolidated=True)


def _same_tree(a: Path, b: Path) -> bool:
    """True when both trees hold the same relative paths with byte-identical contents."""
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return fa == fb and all(filecmp.cmp(a / p, b / p, shallow=False) for p in fa)


def _days(s: str) -> np.datetime64:
    return np.datetime64(f"{s[:4]}-{s[4:6]}-{s[6:8]}")


# --- constants ---------------------------------------------------------------------------------


def test_band_tables():
    assert len(syn.S2_L1C_BANDS) == 13 and len(syn.S2_L2A_BANDS) == 12
    assert syn.S2_L2A_BANDS == tuple(b for b in syn.S2_L1C_BANDS if b != "B10")
    assert syn.S1_BANDS == ("VV", "VH")
    assert set(syn.S2_RESOLUTION_M) == set(syn.S2_L1C_BANDS)
    assert {b for b, r in syn.S2_RESOLUTION_M.items() if r == 10} == {"B2", "B3", "B4", "B8"}
    assert {b for b, r in syn.S2_RESOLUTION_M.items() if r == 60} == {"B1", "B9", "B10"}
    assert len(syn.BIGEARTHNET_19_CLASSES) == 19 == len(set(syn.BIGEARTHNET_19_CLASSES))
    assert set(syn.BIGEARTHNET_LABEL_OF_CLASS.values()) <= set(syn.BIGEARTHNET_19_CLASSES)


def test_bad_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="multiple of 6"):
        syn.make_ssl4eo_tiff(tmp_path, n_locations=1, size=50)


# --- SSL4EO-S12 v1.1 zarr ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def zarr_archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssl4eo_zarr")
    out = syn.make_ssl4eo_zarr(root, splits={"train": 2, "val": 1}, samples_per_file=3, size=48, seed=3)
    return root, out


def test_zarr_layout(zarr_archive):
    root, out = zarr_archive
    for split, n_files in (("train", 2), ("val", 1)):
        for product in ("S1GRD", "S2L1C", "S2L2A"):
            names = sorted(p.name for p in (root / split / product).iterdir())
            assert names == [f"ssl4eos12_{split}_seasonal_data_{i:06d}.zarr.zip" for i in range(1, n_files + 1)]
    ids = [i for sp in out["splits"].values() for f in sp["samples"] for i in f]
    assert len(ids) == len(set(ids)) == 9 and all(re.fullmatch(r"\d{7}", i) for i in ids)


# Band names as the release spells them (the dataset card's xarray listing of an S2L2A and an S1GRD file).
RELEASE_L1C = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
RELEASE_L2A = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B11", "B12")


@pytest.mark.parametrize("product,dtype,bands", [
    ("S1GRD", np.float16, ("vv", "vh")),
    ("S2L1C", np.int16, RELEASE_L1C),
    ("S2L2A", np.int16, RELEASE_L2A),
])
def test_zarr_store_contents(zarr_archive, product, dtype, bands):
    root, out = zarr_archive
    path = out["splits"]["train"]["files"][product][1]
    ds = _open_zip(path)
    assert ds["bands"].dims == ("sample", "time", "band", "y", "x")
    assert ds["bands"].shape == (3, 4, len(bands), 48, 48)
    assert ds["bands"].dtype == dtype
    assert ds["bands"].encoding["chunks"] == (1, 4, len(bands), 48, 48)
    assert tuple(ds["band"].values) == bands
    assert list(ds["time"].values) == [0, 1, 2, 3]
    assert list(ds["sample"].values) == out["splits"]["train"]["samples"][1]
    # As released, the metadata are data variables and x / y are pixel indices.
    assert {"center_lat", "center_lon", "crs", "file_id", "sample_id", "time_", "x_", "y_"} <= set(ds.data_vars)
    assert set(ds.coords) == {"sample", "time", "band", "y", "x"}
    assert ds["time_"].dims == ("sample", "time") and ds["time_"].dtype == np.dtype("datetime64[ns]")
    assert np.all(np.diff(ds["time_"].values, axis=1) > np.timedelta64(30, "D"))  # one per season, sorted
    pattern = S1_ID if product == "S1GRD" else S2_ID
    for sample_ids, times in zip(ds["file_id"].values, ds["time_"].values):
        days = []
        for fid in sample_ids:
            m = pattern.match(str(fid))
            assert m, fid
            days.append(m.group(1))
        stamps = [np.datetime_as_string(t, unit="D").replace("-", "") for t in times]
        if product == "S1GRD":  # as released: file_id in product-name order, time_ sorted (DLR-MF-DAS/SSL4EO-S12-v1.1#4)
            assert list(sample_ids) == sorted(sample_ids) and sorted(days) == stamps
        else:
            assert days == stamps
    assert ds["sample_id"].values[2, 3] == f"{out['splits']['train']['samples'][1][2]}_3"
    assert ds["crs"].dtype == np.int64 and all(UTM.match(f"EPSG:{c}") for c in ds["crs"].values)
    assert np.all(np.abs(ds["center_lat"].values) < 90) and np.all(np.abs(ds["center_lon"].values) <= 180)
    assert ds["x"].dtype == np.int64 and list(ds["x"].values) == list(range(48)) == list(ds["y"].values)
    # x_ / y_: each sample's own 10 m pixel centres, centred on its (lat, lon).
    for i in range(3):
        x, y = ds["x_"].values[i], ds["y_"].values[i]
        assert x.dtype == np.float64 and np.allclose(np.diff(x), 10.0) and np.allclose(np.diff(y), -10.0)
        east, north = rasterio.warp.transform("EPSG:4326", f"EPSG:{ds['crs'].values[i]}",
                                              [float(ds["center_lon"][i])], [float(ds["center_lat"][i])])
        assert abs(x.mean() - east[0]) < 1.0 and abs(y.mean() - north[0]) < 1.0
    values = ds["bands"].values
    if product == "S1GRD":
        assert np.isfinite(values).all() and -50 <= values.min() and values.max() <= 30
    else:
        assert values.min() > 0  # 0 is no-data and none was written
        assert "cloud_mask" in ds and ds["cloud_mask"].dtype == np.uint8


def test_zarr_raw_metadata_is_v2_consolidated(zarr_archive):
    """Pins the on-disk encoding that readers not using xarray rely on."""
    _, out = zarr_archive
    path = out["splits"]["val"]["files"]["S2L2A"][0]
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        assert len(names) == len(set(names))  # no duplicate entries
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        meta = json.loads(zf.read(".zmetadata"))["metadata"]
    assert meta[".zgroup"]["zarr_format"] == 2
    assert meta["bands/.zarray"]["dtype"] == "<i2" and meta["bands/.zarray"]["chunks"] == [1, 4, 12, 48, 48]
    assert meta["time_/.zattrs"]["units"] == "nanoseconds since 1970-01-01"
    assert meta["time_/.zarray"]["dtype"] == "<i8"
    assert meta["sample/.zarray"]["dtype"] == "<U7"
    assert meta["crs/.zarray"]["dtype"] == "<i8"
    assert meta["file_id/.zarray"]["dtype"].startswith("<U")
    group = zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r", zarr_format=2)
    assert group["bands"].shape == (3, 4, 12, 48, 48)


def test_zarr_s2_offset_and_modalities_agree(zarr_archive):
    """Stored S2 = reflectance x 10000 + 1000; S1 of the same file number sees the same ground."""
    _, out = zarr_archive
    files = {p: out["splits"]["train"]["files"][p][0] for p in ("S1GRD", "S2L1C", "S2L2A")}
    s1, l1c, l2a = (_open_zip(files[p]) for p in ("S1GRD", "S2L1C", "S2L2A"))
    assert list(s1["sample"].values) == list(l1c["sample"].values) == list(l2a["sample"].values)
    np.testing.assert_allclose(s1["center_lat"].values, l2a["center_lat"].values)
    water = l2a["cloud_mask"].values.astype(bool)  # (sample, time, y, x)
    assert water.any() and (~water).any()
    b8 = l2a["bands"].sel(band="B08").values.astype(np.float32) - 1000  # reflectance x 10000
    assert 50 < np.median(b8[water]) < 600  # dark water in the NIR
    assert np.median(b8[~water]) > 1200
    # Top of atmosphere is brighter than the surface in the blue (path radiance).
    blue_toa = l1c["bands"].sel(band="B02").values.astype(np.float32)
    blue_boa = l2a["bands"].sel(band="B02").values.astype(np.float32)
    assert np.median(blue_toa - blue_boa) > 200
    vv = s1["bands"].sel(band="vv").values.astype(np.float32)
    vh = s1["bands"].sel(band="vh").values.astype(np.float32)
    assert np.median(vv[water]) < -17 < np.median(vv[~water])
    assert np.median(vv - vh) > 4  # cross-pol is several dB darker
    # S1 is acquired a day or two from S2.
    gap = np.abs(s1["time_"].values - l2a["time_"].values) / np.timedelta64(1, "h")
    assert np.all((gap > 12) & (gap < 72))


def test_zarr_seasons_change_vegetation(zarr_archive):
    _, out = zarr_archive
    ds = _open_zip(out["splits"]["train"]["files"]["S2L2A"][0])
    nir = ds["bands"].sel(band="B08").values.astype(np.float32)
    red = ds["bands"].sel(band="B04").values.astype(np.float32)
    ndvi = (nir - red) / (nir + red - 2000)  # offset removed
    per_time = np.nanmedian(ndvi.reshape(ndvi.shape[0], 4, -1), axis=2)  # (sample, time)
    assert np.max(np.ptp(per_time, axis=1)) > 0.05


def test_zarr_is_deterministic(tmp_path):
    kw = dict(splits={"train": 1}, samples_per_file=2, size=24, products=("S1GRD", "S2L2A"))
    syn.make_ssl4eo_zarr(tmp_path / "a", seed=5, **kw)
    syn.make_ssl4eo_zarr(tmp_path / "b", seed=5, **kw)
    syn.make_ssl4eo_zarr(tmp_path / "c", seed=6, **kw)
    assert _same_tree(tmp_path / "a", tmp_path / "b")
    a = _open_zip(tmp_path / "a/train/S2L2A/ssl4eos12_train_seasonal_data_000001.zarr.zip")
    c = _open_zip(tmp_path / "c/train/S2L2A/ssl4eos12_train_seasonal_data_000001.zarr.zip")
    assert not np.array_equal(a["bands"].values, c["bands"].values)


# --- SSL4EO-S12 v1 GeoTIFF ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiff_archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssl4eo_tiff")
    out = syn.make_ssl4eo_tiff(root, n_locations=4, size=48, seed=1, misaligned=[11], missing_s1=["0000012"],
                               start_id=10)
    return root, out


def _bounds(path):
    with rasterio.open(path) as src:
        return src.crs, src.bounds


def test_tiff_layout_and_encoding(tiff_archive):
    root, out = tiff_archive
    assert out["locations"] == ["0000010", "0000011", "0000012", "0000013"]
    assert sorted(p.name for p in (root / "s2c").iterdir()) == out["locations"]
    assert sorted(p.name for p in (root / "s1").iterdir()) == ["0000010", "0000011", "0000013"]
    for loc in out["locations"]:
        s2_products = sorted(p.name for p in (root / "s2c" / loc).iterdir())
        assert len(s2_products) == 4 and all(S2_ID.match(p) for p in s2_products)
        for product in s2_products:
            files = sorted(p.name for p in (root / "s2c" / loc / product).iterdir())
            assert files == sorted(f"{b}.tif" for b in syn.S2_L1C_BANDS)
            for band in syn.S2_L1C_BANDS:
                with rasterio.open(root / "s2c" / loc / product / f"{band}.tif") as src:
                    n = 48 * 10 // syn.S2_RESOLUTION_M[band]
                    assert (src.count, src.height, src.width) == (1, n, n)
                    assert src.dtypes[0] == "uint16" and src.driver == "GTiff"
                    assert UTM.match(src.crs.to_string())
                    assert src.res == (syn.S2_RESOLUTION_M[band],) * 2
        if loc == "0000012":
            continue
        s1_products = sorted(p.name for p in (root / "s1" / loc).iterdir())
        assert len(s1_products) == 4 and all(S1_ID.match(p) for p in s1_products)
        # Season by season, S1 is a day or two off S2.
        s1_days = sorted(_days(S1_ID.match(p).group(1)) for p in s1_products)
        s2_days = sorted(_days(S2_ID.match(p).group(1)) for p in s2_products)
        gaps = np.abs(np.array(s1_days) - np.array(s2_days)).astype(int)
        assert np.all((gaps >= 1) & (gaps <= 3)), gaps
        for product in s1_products:
            assert sorted(p.name for p in (root / "s1" / loc / product).iterdir()) == ["VH.tif", "VV.tif"]
            with rasterio.open(root / "s1" / loc / product / "VV.tif") as src:
                assert src.dtypes[0] == "float32" and (src.height, src.width) == (48, 48)
                assert src.res == (10.0, 10.0)
                assert np.isfinite(src.read(1)).all()


def test_tiff_georeferencing(tiff_archive):
    root, out = tiff_archive
    for loc in ("0000010", "0000011", "0000013"):
        s2_dir = next((root / "s2c" / loc).iterdir())
        crs2, b2 = _bounds(s2_dir / "B2.tif")
        for band in ("B1", "B5", "B8A", "B12"):  # every resolution covers the same footprint
            assert _bounds(s2_dir / f"{band}.tif") == (crs2, b2)
        for product in (root / "s1" / loc).iterdir():
            crs1, b1 = _bounds(product / "VV.tif")
            assert crs1 == crs2
            shift = 30.0 if loc == "0000011" else 0.0
            assert b1.left == pytest.approx(b2.left + shift) and b1.right == pytest.approx(b2.right + shift)
            assert b1.top == pytest.approx(b2.top) and b1.bottom == pytest.approx(b2.bottom)


def test_tiff_coarse_bands_are_block_means(tiff_archive):
    """A 20 m / 60 m band is the block mean of the field: it tracks its 10 m neighbour in the spectrum."""
    root, _ = tiff_archive
    product = sorted((root / "s2c" / "0000010").iterdir())[0]
    read = lambda b: rasterio.open(product / f"{b}.tif").read(1).astype(np.float32)  # noqa: E731
    b8, b8a, b9 = read("B8"), read("B8A"), read("B9")
    assert np.corrcoef(b8a.ravel(), syn.block_mean(b8, 2).ravel())[0, 1] > 0.9
    assert np.corrcoef(b9.ravel(), syn.block_mean(b8, 6).ravel())[0, 1] > 0.9
    # Nearest-neighbour upsampling lands close to the 10 m band (B8A ~ B8 for every class).
    up = np.repeat(np.repeat(b8a, 2, axis=0), 2, axis=1)
    assert np.median(np.abs(up - b8) / b8) < 0.2


def test_tiff_misaligned_content_follows_its_grid(tiff_archive):
    """The shifted S1 shows the ground under its own (shifted) footprint."""
    root, _ = tiff_archive
    s2 = sorted((root / "s2c" / "0000011").iterdir())[1]
    s1 = sorted((root / "s1" / "0000011").iterdir())
    with rasterio.open(s2 / "B8.tif") as src:
        nir = src.read(1).astype(np.float32)
    vv = np.mean([rasterio.open(p / "VV.tif").read(1) for p in s1], axis=0)
    aligned = np.corrcoef(vv[:, :-3].ravel(), nir[:, 3:].ravel())[0, 1]
    naive = np.corrcoef(vv[:, :-3].ravel(), nir[:, :-3].ravel())[0, 1]
    assert abs(aligned) > abs(naive)


def test_tiff_is_deterministic(tmp_path):
    syn.make_ssl4eo_tiff(tmp_path / "a", n_locations=2, size=24, seed=9, misaligned=[1])
    syn.make_ssl4eo_tiff(tmp_path / "b", n_locations=2, size=24, seed=9, misaligned=[1])
    assert _same_tree(tmp_path / "a", tmp_path / "b")


# --- BigEarthNet v2 ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ben_archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("bigearthnet")
    return root, syn.make_bigearthnet(root, n_patches=12, size=120, seed=0)


def test_bigearthnet_layout(ben_archive):
    root, out = ben_archive
    table = pq.read_table(root / "metadata.parquet")
    assert table.schema.names == ["patch_id", "labels", "split", "country", "s1_name", "s2v1_name",
                                  "contains_seasonal_snow", "contains_cloud_or_shadow"]
    assert str(table.schema.field("labels").type).startswith("list<")
    assert str(table.schema.field("contains_seasonal_snow").type) == "bool"
    meta = table.to_pylist()
    assert [r["patch_id"] for r in meta] == out["patches"] and len(meta) == 12
    assert {r["split"] for r in meta} == {"train", "validation", "test"}
    for r in meta:
        tile, col, row = re.fullmatch(r"(S2[AB]_MSIL2A_\d{8}T\d{6}_N9999_R\d{3}_T(\d{2}[A-Z]{3}))_(\d+)_(\d+)",
                                      r["patch_id"]).group(1, 3, 4)
        mgrs = tile[-5:]
        assert re.fullmatch(rf"S1[AB]_IW_GRDH_1SDV_\d{{8}}T\d{{6}}_{mgrs}_{col}_{row}", r["s1_name"])
        assert r["s2v1_name"] == f"{tile.split('_N9999_')[0]}_{col}_{row}"
        assert r["labels"] and set(r["labels"]) <= set(syn.BIGEARTHNET_19_CLASSES)
        assert r["country"] and r["contains_seasonal_snow"] is False
        s2_dir = root / "BigEarthNet-S2" / tile / r["patch_id"]
        assert sorted(p.name for p in s2_dir.iterdir()) == sorted(
            f"{r['patch_id']}_{b}.tif" for b in syn.BIGEARTHNET_S2_BANDS)
        s1_tile = r["s1_name"][: -len(f"_{mgrs}_{col}_{row}")]
        s1_dir = root / "BigEarthNet-S1" / s1_tile / r["s1_name"]
        crs2, b2 = _bounds(s2_dir / f"{r['patch_id']}_B02.tif")
        for band, n in (("B02", 120), ("B05", 60), ("B09", 20)):
            with rasterio.open(s2_dir / f"{r['patch_id']}_{band}.tif") as src:
                assert (src.height, src.width) == (n, n) and src.dtypes[0] == "uint16"
                assert (src.crs, src.bounds) == (crs2, b2)
        for pol in ("VV", "VH"):
            with rasterio.open(s1_dir / f"{r['s1_name']}_{pol}.tif") as src:
                assert (src.height, src.width) == (120, 120) and src.dtypes[0] == "float32"
                assert (src.crs, src.bounds) == (crs2, b2)
                assert src.res == (10.0, 10.0)


def test_bigearthnet_labels_follow_pixels(ben_archive):
    """Water seen in the pixels (dark NIR) <=> the "Inland waters" label."""
    root, _ = ben_archive
    wet = dry = 0
    for r in pq.read_table(root / "metadata.parquet").to_pylist():
        tile = r["patch_id"].rsplit("_", 2)[0]
        path = root / "BigEarthNet-S2" / tile / r["patch_id"] / f"{r['patch_id']}_B08.tif"
        with rasterio.open(path) as src:
            water_fraction = float((src.read(1) < 1000).mean())
        if water_fraction >= 0.08:
            assert "Inland waters" in r["labels"], (r["patch_id"], water_fraction)
            wet += 1
        elif water_fraction <= 0.02:
            assert "Inland waters" not in r["labels"], (r["patch_id"], water_fraction)
            dry += 1
    assert wet and dry  # both cases were exercised


def test_bigearthnet_small_has_every_split_and_is_deterministic(tmp_path):
    a = syn.make_bigearthnet(tmp_path / "a", n_patches=3, size=60, seed=4)
    syn.make_bigearthnet(tmp_path / "b", n_patches=3, size=60, seed=4)
    assert all(len(v) == 1 for v in a["splits"].values())
    assert _same_tree(tmp_path / "a", tmp_path / "b")


# --- command line ------------------------------------------------------------------------------


def test_cli(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.synthetic", "bigearthnet", str(tmp_path), "--n", "3", "--size", "60",
         "--seed", "2"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(pq.read_table(tmp_path / "metadata.parquet")) == 3
    out = syn.main(["ssl4eo-tiff", str(tmp_path / "tiff"), "--n", "1", "--size", "24"])
    assert out["locations"] == ["0000000"]
