"""SSL4EO-S12 v1: one GeoTIFF per band, season and modality, as :mod:`pipeline.sources.ssl4eo_tiff` reads them.

Folder names as published (:mod:`pipeline.synthetic.published`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from pipeline.synthetic.geo import Location, location
from pipeline.synthetic.geotiff import encode_s2_tif, write_tif
from pipeline.synthetic.published import (
    S1_BANDS,
    S2_L1C_BANDS,
    S2_RESOLUTION_M,
    SSL4EO_TIFF_S1_DIR as S1_DIR,
    SSL4EO_TIFF_S2_DIRS as S2_DIRS,
)
from pipeline.synthetic.scene import (
    STREAM_S1,
    STREAM_S2,
    check_size,
    keyed_rng,
    render_s1,
    render_s2,
    to_native_resolution,
)

_MISALIGNED_PX = 3  # S1 shift of a misaligned location, in 10 m pixels east


def make_ssl4eo_tiff(root: str | Path, n_locations: int = 3, size: int = 264, seed: int = 0,
                     misaligned: Iterable[int | str] = (), missing_s1: Iterable[int | str] = (),
                     start_id: int = 0) -> dict:
    """Write an SSL4EO-S12 v1 GeoTIFF tree for locations ``start_id .. start_id + n_locations - 1``.

    ``root/s1/<id>/<S1 product id>/{VV,VH}.tif``: float32 dB, size x size, 10 m.
    ``root/s2c/<id>/<S2 product id>/{B1..B12,B8A}.tif``: uint16 L1C reflectance x 10000
    (no offset), at native resolution: 10 m bands size px, 20 m size/2, 60 m size/6 (the
    block means of the 10 m field). ``<id>`` is 7 digits; one product folder per season
    and modality (4 each). Every file is a one-band GeoTIFF in the location's UTM CRS.
    S1 and S2 cover the same footprint, except for ids in ``misaligned`` whose S1 grid
    (and content) is shifted 3 pixels (30 m) east; ids in ``missing_s1`` get no S1 folder.

    Returns {"root", "size", "locations": [id, ...], "s1": {id: [product, ...]},
    "s2": {id: [product, ...]}, "misaligned": [id, ...], "missing_s1": [id, ...]}.
    """
    check_size(size)
    root = Path(root)
    names = [f"{i:07d}" for i in range(start_id, start_id + n_locations)]
    misaligned_ids = {f"{int(i):07d}" for i in misaligned}
    missing_ids = {f"{int(i):07d}" for i in missing_s1}
    result: dict = {"root": str(root), "size": size, "locations": names, "s1": {}, "s2": {},
                    "misaligned": sorted(misaligned_ids & set(names)), "missing_s1": sorted(missing_ids & set(names))}
    for loc_id, name in zip(range(start_id, start_id + n_locations), names):
        loc = location(seed, loc_id, size)
        result["s2"][name] = _write_s2(root, seed, loc, size)
        if name not in missing_ids:
            dx = _MISALIGNED_PX if name in misaligned_ids else 0
            result["s1"][name] = _write_s1(root, seed, loc, size, dx)
    return result


def _write_s2(root: Path, seed: int, loc: Location, size: int) -> list[str]:
    """The four L1C product folders of ``loc``, every band at its native resolution; returns the product ids."""
    acq, fp = loc.acquisitions, loc.footprint
    refl = render_s2(keyed_rng(seed, STREAM_S2, loc.id), loc.scene.crop(size), acq.seasons, "L1C")
    per_band = to_native_resolution(refl, S2_L1C_BANDS)  # each (4, h_b, w_b)
    for t, product in enumerate(acq.s2_ids):
        for b, band in enumerate(S2_L1C_BANDS):
            write_tif(root / S2_DIRS["L1C"] / loc.name / product / f"{band}.tif", encode_s2_tif(per_band[b][t]),
                      fp.crs, fp.transform(S2_RESOLUTION_M[band]))
    return list(acq.s2_ids)


def _write_s1(root: Path, seed: int, loc: Location, size: int, dx: int) -> list[str]:
    """The four S1 product folders of ``loc``, grid and ground shifted ``dx`` pixels east; returns the product ids."""
    acq, fp = loc.acquisitions, loc.footprint
    db = render_s1(keyed_rng(seed, STREAM_S1, loc.id), loc.scene.crop(size, dx), acq.seasons)
    for t, product in enumerate(acq.s1_ids):
        for p, pol in enumerate(S1_BANDS):
            write_tif(root / S1_DIR / loc.name / product / f"{pol}.tif", db[t, p], fp.crs, fp.transform(10, dx))
    return list(acq.s1_ids)
