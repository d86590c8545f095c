"""Writing single-band GeoTIFFs as the published GeoTIFF layouts store them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio

from pipeline.synthetic.published import S2_NODATA


def write_tif(path: Path, array: np.ndarray, crs: str, transform) -> None:
    """One single-band GeoTIFF (deflate), ``array`` (H, W) in its final dtype."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "GTiff", "count": 1, "dtype": array.dtype.name, "height": array.shape[0],
        "width": array.shape[1], "crs": crs, "transform": transform, "compress": "deflate",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array, 1)


def encode_s2_tif(reflectance: np.ndarray) -> np.ndarray:
    """Reflectance x 10000 (float) -> uint16, no offset; the no-data value is never written."""
    return np.clip(np.rint(reflectance), S2_NODATA + 1, np.iinfo(np.uint16).max).astype(np.uint16)
