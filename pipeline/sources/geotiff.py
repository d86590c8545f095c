"""Reading GeoTIFF files through fsspec, footprint comparison, and sampling onto the 10 m grid.

Files are fetched as bytes through the source's fsspec filesystem (one
concurrent ``cat`` for all bands of a sample on object stores) and decoded by
rasterio from memory, so S3 credentials follow the same chain as every other
access of the project.

Every band reaches the 10 m grid of the reference band (B2) the same way: its value
at each 10 m pixel centre, taken from the band pixel that contains that centre, found
through the band's own geotransform (nearest neighbour: exact values, no
interpolation). For a 20 m or 60 m grid that shares the 10 m grid's corner this is
each pixel repeated 2 x 2 or 6 x 6 times; for a grid offset by a fraction of its pixel,
or one pixel larger, it follows the georeferencing instead of the top-left corner. A
band is only refused when its footprint differs from the reference's by a whole pixel
of its own resolution or more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import rasterio
from affine import Affine
from rasterio.io import MemoryFile
from rasterio.warp import transform as warp_transform
from rasterio.warp import transform_bounds

from pipeline.sources.base import (
    MISALIGNED,
    S2_RESOLUTION_M,
    UNREADABLE,
    WRONG_BAND_COUNT,
    WRONG_SHAPE,
)
from pipeline.storage import retrying

RESAMPLING = ("nearest neighbour at the 10 m pixel centres of the B2 grid, through each band's own geotransform "
              "(exact values; 20 m / 60 m bands sharing the grid's corner are their pixels repeated 2x2 / 6x6); "
              "a band whose footprint is off by a whole pixel of its resolution or more is quarantined (wrong_shape)")
"""How bands reach the 10 m grid, as recorded in the manifests of the GeoTIFF sources."""


@dataclass
class Raster:
    data: np.ndarray  # (h, w) in the file's dtype; (bands, h, w) from `decode_stack`
    crs: Optional[str]
    bounds: tuple[float, float, float, float]  # left, bottom, right, top in `crs` units
    res: tuple[float, float]
    nodata: Optional[float]
    transform: Optional[Affine] = None
    """Pixel (col, row) -> map (x, y) of the file's grid."""


class RasterError(Exception):
    """A file that cannot be decoded as a GeoTIFF (corrupt, truncated, empty)."""


def _decode(data: bytes, name: str, stack: bool) -> Raster:
    try:
        with MemoryFile(data) as mem, mem.open() as ds:
            if ds.count < 1:
                raise RasterError(f"{name}: no band")
            arr = ds.read() if stack else ds.read(1)
            crs = ds.crs.to_string() if ds.crs else None
            return Raster(arr, crs, tuple(ds.bounds), tuple(ds.res), ds.nodata, ds.transform)
    except RasterError:
        raise
    except Exception as err:  # rasterio raises several error classes for corrupt files
        raise RasterError(f"{name}: {type(err).__name__}: {err}") from err


def decode(data: bytes, name: str) -> Raster:
    """The first band of a GeoTIFF: ``data`` (h, w)."""
    return _decode(data, name, stack=False)


def decode_stack(data: bytes, name: str) -> Raster:
    """Every band of a multi-band GeoTIFF: ``data`` (bands, h, w), in file order."""
    return _decode(data, name, stack=True)


def fetch(fs, paths: Sequence[str]) -> dict[str, bytes]:
    """Bytes of every path; missing files raise FileNotFoundError naming the path."""
    if not paths:
        return {}
    out = retrying(fs.cat)(list(paths), on_error="return")
    if not isinstance(out, dict):  # a single path returns bytes
        out = {paths[0]: out}
    for p in paths:
        v = out.get(p)
        if isinstance(v, FileNotFoundError) or v is None:
            raise FileNotFoundError(p)
        if isinstance(v, BaseException):
            raise v
    return out


def footprint_offset_m(a: Raster, b: Raster) -> float:
    """Largest difference between the bounds of ``a`` and ``b``, in ``b``'s CRS units (metres for UTM)."""
    bounds_a = a.bounds
    if a.crs and b.crs and a.crs != b.crs:
        bounds_a = transform_bounds(a.crs, b.crs, *a.bounds)
    return float(max(abs(x - y) for x, y in zip(bounds_a, b.bounds)))


def center_lonlat(r: Raster) -> tuple[Optional[float], Optional[float]]:
    """(lon, lat) in degrees of the raster's centre, or (None, None) without a CRS."""
    if not r.crs:
        return None, None
    left, bottom, right, top = r.bounds
    x, y = (left + right) / 2, (bottom + top) / 2
    if rasterio.crs.CRS.from_string(r.crs).is_geographic:
        return float(x), float(y)
    lons, lats = warp_transform(r.crs, "EPSG:4326", [x], [y])
    return round(float(lons[0]), 7), round(float(lats[0]), 7)


def same_grid(a: Raster, b: Raster) -> bool:
    """True when ``a`` has exactly ``b``'s pixel grid (size, CRS, geotransform to a micrometre)."""
    return (a.data.shape[-2:] == b.data.shape[-2:] and a.crs == b.crs and a.transform is not None
            and b.transform is not None and a.transform.almost_equals(b.transform, precision=1e-6))


def sample_onto(src: Raster, grid: Raster) -> np.ndarray:
    """``src`` on ``grid``'s pixel grid by nearest neighbour: (..., H, W) in ``src``'s dtype.

    Each pixel centre of ``grid`` is mapped to map coordinates, then through the inverse
    of ``src``'s geotransform to the ``src`` pixel containing it (clipped to the edge for
    centres within the footprint tolerance outside it). Returns ``src.data`` itself when
    the grids are the same.
    """
    if same_grid(src, grid):
        return src.data
    h, w = grid.data.shape[-2:]
    cols, rows = np.arange(w) + 0.5, np.arange(h) + 0.5
    g = grid.transform
    x = g.a * cols[None, :] + g.b * rows[:, None] + g.c  # (H, W) map coordinates
    y = g.d * cols[None, :] + g.e * rows[:, None] + g.f
    if src.crs and grid.crs and src.crs != grid.crs:
        xs, ys = warp_transform(grid.crs, src.crs, x.ravel(), y.ravel())
        x, y = np.reshape(xs, (h, w)), np.reshape(ys, (h, w))
    inv = ~src.transform
    col = np.floor(inv.a * x + inv.b * y + inv.c).astype(np.int64)
    row = np.floor(inv.d * x + inv.e * y + inv.f).astype(np.int64)
    sh, sw = src.data.shape[-2:]
    return src.data[..., np.clip(row, 0, sh - 1), np.clip(col, 0, sw - 1)]


@dataclass
class PairFailure:
    """Why a pair of band sets cannot become a sample: the file to blame, a quarantine reason, details."""

    path: str
    reason: str
    detail: str


def read_pair(fs, s1_paths: Sequence[str], s2_paths: Sequence[str], s2_bands: Sequence[str],
              ref_band: str = "B2") -> "tuple[np.ndarray, np.ndarray, Raster] | PairFailure":
    """Read one S1/S2 pair of single-band GeoTIFFs onto the 10 m grid of ``ref_band``.

    Returns (s1 (2, H, W), s2 (C, H, W), the 10 m reference raster) or the reason it failed:
    a missing band file, an undecodable file, an S2 band whose footprint is off the
    reference's by a whole pixel of its resolution or more (wrong_shape), or an S1 footprint
    more than one 10 m pixel off (misaligned). Bands on another pixel grid with the same
    footprint are sampled onto the 10 m grid (`sample_onto`).
    """
    try:
        raw = fetch(fs, list(s1_paths) + list(s2_paths))
    except FileNotFoundError as err:
        return PairFailure(str(err), WRONG_BAND_COUNT, f"missing band file {str(err).rsplit('/', 1)[-1]}")
    except OSError as err:
        return PairFailure(s2_paths[0], UNREADABLE, f"{type(err).__name__}: {err}")
    rasters = {}
    for path in list(s1_paths) + list(s2_paths):
        try:
            rasters[path] = decode(raw[path], path.rsplit("/", 1)[-1])
        except RasterError as err:
            return PairFailure(path, UNREADABLE, str(err))
    ref = rasters[s2_paths[list(s2_bands).index(ref_band)]]
    bands = []
    for band, path in zip(s2_bands, s2_paths):
        r, res = rasters[path], S2_RESOLUTION_M[band]
        offset = footprint_offset_m(r, ref)
        if offset >= res * (1 - 1e-9):
            return PairFailure(path, WRONG_SHAPE, f"{band} ({r.data.shape[0]}x{r.data.shape[1]} px) covers a footprint "
                                                  f"{offset:.1f} m off {ref_band}'s (>= one {res} m pixel)")
        bands.append(sample_onto(r, ref))
    pixel = abs(ref.res[0])
    for path in s1_paths:
        offset = footprint_offset_m(rasters[path], ref)
        if offset > pixel:
            return PairFailure(path.rsplit("/", 1)[0], MISALIGNED,
                               f"S1 and S2 footprints differ by {offset:.1f} m (> one {pixel:g} m pixel)")
    return np.stack([sample_onto(rasters[p], ref) for p in s1_paths]), np.stack(bands), ref
