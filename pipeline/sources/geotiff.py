"""Reading single-band GeoTIFF files through fsspec, and footprint comparison.

Files are fetched as bytes through the source's fsspec filesystem (one
concurrent ``cat`` for all bands of a sample on object stores) and decoded by
rasterio from memory, so S3 credentials follow the same chain as every other
access of the project.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import rasterio
from rasterio.io import MemoryFile
from rasterio.warp import transform as warp_transform
from rasterio.warp import transform_bounds

from pipeline.sources.base import (
    MISALIGNED,
    S2_RESOLUTION_M,
    UNREADABLE,
    WRONG_BAND_COUNT,
    WRONG_SHAPE,
    upsample_nearest,
)
from pipeline.storage import retrying


@dataclass
class Raster:
    data: np.ndarray  # (h, w) in the file's dtype
    crs: Optional[str]
    bounds: tuple[float, float, float, float]  # left, bottom, right, top in `crs` units
    res: tuple[float, float]
    nodata: Optional[float]


class RasterError(Exception):
    """A file that cannot be decoded as a single-band GeoTIFF (corrupt, truncated, empty)."""


def decode(data: bytes, name: str) -> Raster:
    try:
        with MemoryFile(data) as mem, mem.open() as ds:
            if ds.count < 1:
                raise RasterError(f"{name}: no band")
            arr = ds.read(1)
            crs = ds.crs.to_string() if ds.crs else None
            return Raster(arr, crs, tuple(ds.bounds), tuple(ds.res), ds.nodata)
    except RasterError:
        raise
    except Exception as err:  # rasterio raises several error classes for corrupt files
        raise RasterError(f"{name}: {type(err).__name__}: {err}") from err


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


@dataclass
class PairFailure:
    """Why a pair of band sets cannot become a sample: the file to blame, a quarantine reason, details."""

    path: str
    reason: str
    detail: str


def read_pair(fs, s1_paths: Sequence[str], s2_paths: Sequence[str], s2_bands: Sequence[str],
              ref_band: str = "B2") -> "tuple[np.ndarray, np.ndarray, Raster] | PairFailure":
    """Read one S1/S2 pair of single-band GeoTIFFs onto the 10 m grid.

    Returns (s1 (2, H, W), s2 (C, H, W), the 10 m reference raster) or the reason it failed:
    a missing band file, an undecodable file, a band whose size does not fit its resolution,
    an S1 grid unlike the S2 grid, or footprints more than one 10 m pixel apart (misaligned).
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
    h, w = ref.data.shape
    bands = []
    for band, path in zip(s2_bands, s2_paths):
        factor = S2_RESOLUTION_M[band] // 10
        arr = rasters[path].data
        if arr.shape != (h // factor, w // factor) or h % factor or w % factor:
            return PairFailure(path, WRONG_SHAPE, f"{band} is {arr.shape}, expected {(h // factor, w // factor)} "
                                                  f"for a {S2_RESOLUTION_M[band]} m band on a {h}x{w} 10 m grid")
        bands.append(upsample_nearest(arr, factor))
    for path in s1_paths:
        if rasters[path].data.shape != (h, w):
            return PairFailure(path, WRONG_SHAPE, f"S1 {path.rsplit('/', 1)[-1]} is {rasters[path].data.shape}, "
                                                  f"S2 grid is {(h, w)}")
    offset = footprint_offset_m(rasters[s1_paths[0]], ref)
    pixel = abs(ref.res[0])
    if offset > pixel:
        return PairFailure(s1_paths[0].rsplit("/", 1)[0], MISALIGNED,
                           f"S1 and S2 footprints differ by {offset:.1f} m (> one {pixel:g} m pixel)")
    return np.stack([rasters[p].data for p in s1_paths]), np.stack(bands), ref
