"""Bands on another pixel grid than the 10 m reference: sampled through their georeferencing when the
footprint matches, quarantined when it does not.

The reference is a 12 x 12 px, 10 m grid with its corner at (500000, 5000120). Expected index lists are
worked out by hand from the geometry: 10 m pixel centre c sits at 10 c + 5 m from the corner, and lies
in the band pixel floor((10 c + 5 + shift) / resolution) of a band whose grid starts ``shift`` metres
before the corner.
"""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pytest
import rasterio
from affine import Affine

from pipeline import synthetic
from pipeline.sources import SOURCES, SourceOptions
from pipeline.sources.geotiff import read_pair

LEFT, TOP, CRS = 500000.0, 5000120.0, "EPSG:32632"
FS = fsspec.filesystem("file")
# 10 m pixel -> 20 m band pixel for a grid starting 10 m before the corner (13 px cover it)
IDX_20M_SHIFT_10 = [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
# 10 m pixel -> 60 m band pixel for a grid starting 30 m before the corner (3 px cover 120 m + 2 x 30 m)
IDX_60M_SHIFT_30 = [0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2]


def _tif(path: Path, array: np.ndarray, res: float, shift_w: float = 0.0, shift_n: float = 0.0,
         crs: str = CRS) -> str:
    """A one-band GeoTIFF whose grid corner is ``shift_w`` m west and ``shift_n`` m north of (LEFT, TOP)."""
    transform = Affine(res, 0.0, LEFT - shift_w, 0.0, -res, TOP + shift_n)
    with rasterio.open(path, "w", driver="GTiff", count=1, dtype=array.dtype.name, height=array.shape[0],
                       width=array.shape[1], crs=crs, transform=transform) as dst:
        dst.write(array, 1)
    return str(path)


def _grid(n: int, dtype=np.uint16, start: int = 1) -> np.ndarray:
    return (np.arange(n * n).reshape(n, n) + start).astype(dtype)


@pytest.fixture
def pair(tmp_path):
    """Paths of an aligned pair: S1 VV / VH (12 px) and S2 B2 (10 m), B5 (20 m), B9 (60 m), all on the corner."""
    paths = {
        "VV": _tif(tmp_path / "VV.tif", _grid(12, np.float32, -20), 10),
        "VH": _tif(tmp_path / "VH.tif", _grid(12, np.float32, -30), 10),
        "B2": _tif(tmp_path / "B2.tif", _grid(12), 10),
        "B5": _tif(tmp_path / "B5.tif", _grid(6), 20),
        "B9": _tif(tmp_path / "B9.tif", _grid(2), 60),
    }
    return tmp_path, paths


def _read(paths):
    return read_pair(FS, [paths["VV"], paths["VH"]], [paths["B2"], paths["B5"], paths["B9"]], ("B2", "B5", "B9"))


def test_aligned_coarse_bands_are_their_pixels_repeated(pair):
    _, paths = pair
    s1, s2, ref = _read(paths)
    assert s1.shape == (2, 12, 12) and s2.shape == (3, 12, 12) and s2.dtype == np.uint16
    np.testing.assert_array_equal(s2[0], _grid(12))
    np.testing.assert_array_equal(s2[1], np.kron(_grid(6), np.ones((2, 2), np.uint16)))
    np.testing.assert_array_equal(s2[2], np.kron(_grid(2), np.ones((6, 6), np.uint16)))
    np.testing.assert_array_equal(s1[0], _grid(12, np.float32, -20))
    assert ref.crs == CRS


def test_offset_grids_follow_their_georeferencing(pair):
    tmp, paths = pair
    b5, b9 = _grid(7), _grid(3)
    paths["B5"] = _tif(tmp / "B5.tif", b5, 20, shift_w=10, shift_n=10)  # 7 px: 140 m over the 120 m footprint
    paths["B9"] = _tif(tmp / "B9.tif", b9, 60, shift_w=30, shift_n=30)  # 3 px: 180 m over it
    _, s2, _ = _read(paths)
    np.testing.assert_array_equal(s2[1], b5[np.ix_(IDX_20M_SHIFT_10, IDX_20M_SHIFT_10)])
    np.testing.assert_array_equal(s2[2], b9[np.ix_(IDX_60M_SHIFT_30, IDX_60M_SHIFT_30)])


def test_a_10m_band_on_a_coarser_grid_and_an_s1_row_too_many(pair):
    tmp, paths = pair
    paths["B2"] = _tif(tmp / "B2.tif", _grid(12), 10)
    paths["B5"] = _tif(tmp / "B5.tif", _grid(12), 10)  # a 20 m band delivered at 10 m, same footprint
    vv = _grid(13, np.float32)[:, :12]  # one row more: its footprint ends 10 m lower (within one pixel)
    paths["VV"] = _tif(tmp / "VV.tif", vv, 10)
    s1, s2, _ = _read(paths)
    np.testing.assert_array_equal(s2[1], _grid(12))
    np.testing.assert_array_equal(s1[0], vv[:12])


@pytest.mark.parametrize("band, array, res, shift_w, reason", [
    ("B5", _grid(6), 20, -40.0, "wrong_shape"),   # 40 m east: two 20 m pixels off
    ("B5", _grid(6)[:, :5], 20, 0.0, "wrong_shape"),  # a 20 m column missing
    ("B9", _grid(3), 60, 0.0, "wrong_shape"),     # 180 m wide on a 120 m footprint
    ("VV", _grid(12, np.float32), 10, -30.0, "misaligned"),  # S1 30 m east
])
def test_footprint_mismatch_is_quarantined(pair, band, array, res, shift_w, reason):
    tmp, paths = pair
    paths[band] = _tif(tmp / f"{band}.tif", array, res, shift_w=shift_w)
    got = _read(paths)
    assert got.reason == reason
    assert Path(got.path).name == f"{band}.tif" or (reason == "misaligned" and got.path == str(tmp))


# -- through a reader: BigEarthNet patches whose band files were re-gridded ------------------------


def _regrid(path: Path, array: np.ndarray, res: float, shift_w: float, shift_n: float) -> None:
    """Rewrite a band file with ``array`` on a grid starting ``shift_*`` metres west / north of its corner."""
    with rasterio.open(path) as src:
        profile, t = src.profile, src.transform
    profile.update(width=array.shape[1], height=array.shape[0],
                   transform=Affine(res, 0.0, t.c - shift_w, 0.0, -res, t.f + shift_n))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array, 1)


def test_bigearthnet_accepts_regridded_bands_and_quarantines_a_shifted_one(tmp_path):
    root = tmp_path / "ben"
    out = synthetic.make_bigearthnet(root, n_patches=3, size=12, seed=3)
    pids = out["patches"]
    band_file = lambda pid, band: root / "BigEarthNet-S2" / pid.rsplit("_", 2)[0] / pid / f"{pid}_{band}.tif"  # noqa: E731
    b05, b01, b11 = _grid(7), _grid(3), _grid(6)
    _regrid(band_file(pids[0], "B05"), b05, 20, 10, 10)
    _regrid(band_file(pids[1], "B01"), b01, 60, 30, 30)
    _regrid(band_file(pids[2], "B11"), b11, 20, -40, 0)  # 40 m east
    source = SOURCES["bigearthnet"](str(root), SourceOptions())
    items, results = [], []
    for split in source.available_splits():
        its, rejects = source.plan(split, lambda fn, args: [fn(a) for a in args])
        assert rejects == []
        items += its
        results += list(source.read(its, split))
    by_id = {r.sample_id if hasattr(r, "sample_id") else r.meta["sample_id"]: r for r in results}
    assert len(items) == 3 == len(by_id)
    bands = list(source.s2_bands)
    np.testing.assert_array_equal(by_id[pids[0]].s2[bands.index("B5")], b05[np.ix_(IDX_20M_SHIFT_10, IDX_20M_SHIFT_10)])
    np.testing.assert_array_equal(by_id[pids[1]].s2[bands.index("B1")], b01[np.ix_(IDX_60M_SHIFT_30, IDX_60M_SHIFT_30)])
    rejected = by_id[pids[2]]
    assert rejected.reason == "wrong_shape" and rejected.url.endswith("_B11.tif") and "40.0 m" in rejected.detail
    assert "nearest neighbour" in source.describe()["resampling"]
