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
