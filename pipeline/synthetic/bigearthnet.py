"""BigEarthNet v2 (reBEN): GeoTIFF patch pairs plus ``metadata.parquet``.

The layout :mod:`pipeline.sources.bigearthnet` reads; folder names and band suffixes as published
(:mod:`pipeline.synthetic.published`).

Labels are read off the land cover: one BigEarthNet-19 label per land-cover class,
given to a patch when that class covers enough of its pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rasterio.warp import transform as warp_transform

from pipeline.synthetic.geo import north_up, season_of, stamp, utm_epsg
from pipeline.synthetic.geotiff import encode_s2_tif, write_tif
from pipeline.synthetic.published import (
    BIGEARTHNET_19_CLASSES,
    BIGEARTHNET_METADATA,
    BIGEARTHNET_S1_ROOT,
    BIGEARTHNET_S2_FILE_BANDS,
    BIGEARTHNET_S2_ROOT,
    BIGEARTHNET_SPLITS,
    S1_BANDS,
    S2_L2A_BANDS,
    S2_RESOLUTION_M,
)
from pipeline.synthetic.scene import (
    LAND_COVER_CLASSES,
    STREAM_ARCHIVE,
    STREAM_S1,
    STREAM_S2,
    STREAM_SCENE,
    check_size,
    class_fractions,
    draw_scene,
    keyed_rng,
    render_s1,
    render_s2,
    to_native_resolution,
)

# BigEarthNet spells the same L2A bands with two digits.
BIGEARTHNET_S2_BANDS = BIGEARTHNET_S2_FILE_BANDS

# One BigEarthNet-19 label per class, so that a label is exactly "this class covers enough pixels".
BIGEARTHNET_LABEL_OF_CLASS = {
    "water": "Inland waters",
    "forest": "Mixed forest",
    "cropland": "Arable land",
    "urban": "Urban fabric",
    "grassland": "Pastures",
    "bare": "Natural grassland and sparsely vegetated areas",
}
# A class covering at least this fraction of a patch gets its label.
LABEL_MIN_FRACTION = 0.05

# BigEarthNet patches draw from their own key space (SSL4EO locations use none).
_BEN_KEY = 1
# (country, MGRS tile, lat, lon of a point in the tile): where BigEarthNet patches come from.
_BEN_TILES = (
    ("Austria", "33UUP", 47.9, 13.4),
    ("Portugal", "29SND", 39.2, -8.3),
    ("Finland", "35VLH", 61.2, 24.8),
    ("Ireland", "29UNV", 53.3, -7.6),
    ("Serbia", "34TDQ", 44.6, 20.4),
    ("Lithuania", "34UFG", 55.1, 23.6),
    ("Belgium", "31UFS", 50.8, 4.4),
    ("Switzerland", "32TMT", 46.9, 8.0),
    ("Luxembourg", "32ULA", 49.7, 6.2),
    ("Kosovo", "34TEN", 42.6, 21.0),
)
_BEN_PATCH_M = 1200  # patch grid spacing within a tile: 120 px at 10 m
_GRID = 90  # patch columns and rows per tile
_SCHEMA = pa.schema([
    ("patch_id", pa.string()), ("labels", pa.list_(pa.string())), ("split", pa.string()),
    ("country", pa.string()), ("s1_name", pa.string()), ("s2v1_name", pa.string()),
    ("contains_seasonal_snow", pa.bool_()), ("contains_cloud_or_shadow", pa.bool_()),
])


def bigearthnet_labels(classes: np.ndarray) -> list[str]:
    """BigEarthNet-19 labels of a class map, in nomenclature order (classes above LABEL_MIN_FRACTION)."""
    frac = class_fractions(classes)
    present = {BIGEARTHNET_LABEL_OF_CLASS[c] for c, f in zip(LAND_COVER_CLASSES, frac) if f >= LABEL_MIN_FRACTION}
    return [name for name in BIGEARTHNET_19_CLASSES if name in present]


def make_bigearthnet(root: str | Path, n_patches: int = 12, size: int = 120, seed: int = 0,
                     splits: Sequence[str] = BIGEARTHNET_SPLITS) -> dict:
    """Write a BigEarthNet v2 (reBEN) archive of ``n_patches`` S1/S2 patch pairs.

    ``root/BigEarthNet-S2/<tile>/<patch_id>/<patch_id>_<band>.tif``: the 12 L2A bands
    (:data:`BIGEARTHNET_S2_BANDS`), uint16 reflectance x 10000; 10 m bands size px,
    20 m size/2, 60 m size/6. ``<tile>`` = S2A_MSIL2A_<date>_N9999_R<orbit>_T<mgrs>,
    ``<patch_id>`` = <tile>_<col>_<row>.
    ``root/BigEarthNet-S1/<s1 tile>/<s1_name>/<s1_name>_{VV,VH}.tif``: float32 dB,
    size px; ``<s1 tile>`` = S1x_IW_GRDH_1SDV_<start>, ``<s1_name>`` = <s1 tile>_<mgrs>_<col>_<row>.
    S1 and S2 of a patch share CRS and footprint (10 m grid, size x 10 m across; patch
    origins are 1200 m apart within a tile as in the real grid).
    ``root/metadata.parquet``: patch_id, labels (list of BigEarthNet-19 names, from the
    classes covering >= LABEL_MIN_FRACTION of the patch), split, country, s1_name,
    s2v1_name, contains_seasonal_snow, contains_cloud_or_shadow (both False).

    Splits go round-robin over a seeded shuffle, so each split has a patch once
    n_patches >= len(splits). Returns {"root", "size", "patches": [patch_id, ...],
    "s1_names": [...], "splits": {split: [patch_id, ...]}, "labels": {patch_id: [...]},
    "metadata": path}.
    """
    check_size(size)
    if not splits:
        raise ValueError("splits must name at least one split")
    root = Path(root)
    rng = keyed_rng(seed, STREAM_ARCHIVE, _BEN_KEY)
    n_tiles = max(1, min(len(_BEN_TILES), math.ceil(n_patches / 4)))
    tiles = [_draw_tile(rng, *_BEN_TILES[i]) for i in rng.permutation(len(_BEN_TILES))[:n_tiles]]
    order = rng.permutation(n_patches)
    split_of = {int(p): splits[k % len(splits)] for k, p in enumerate(order)}
    rows: list[dict] = []
    result: dict = {"root": str(root), "size": size, "patches": [], "s1_names": [],
                    "splits": {s: [] for s in splits}, "labels": {}}
    for p in range(n_patches):
        # Round-robin over the tiles; each patch takes the tile's next unused cell.
        tile = tiles[p % n_tiles]
        record = _write_patch(root, seed, p, tile, int(tile.cells[p // n_tiles]), size)
        rows.append({**record, "split": split_of[p]})
        result["patches"].append(record["patch_id"])
        result["s1_names"].append(record["s1_name"])
        result["splits"][split_of[p]].append(record["patch_id"])
        result["labels"][record["patch_id"]] = record["labels"]
    result["metadata"] = str(_write_metadata(root, rows))
    return result


@dataclass(frozen=True)
class _Tile:
    """One S2 acquisition of an MGRS tile and its S1 partner: the names and grid its patches share."""

    country: str
    mgrs: str
    s2_tile: str  # S2x_MSIL2A_<sensing start>_N9999_R<orbit>_T<mgrs>
    s1_tile: str  # S1x_IW_GRDH_1SDV_<start>
    epsg: int
    origin: tuple[float, float]  # (left, top) of the tile's patch grid, metres in ``epsg``
    cells: np.ndarray  # distinct patch cells (col + 90 * row) in the order patches take them
    season: int


def _draw_tile(rng: np.random.Generator, country: str, mgrs: str, lat: float, lon: float) -> _Tile:
    """One S2 acquisition of the tile (BigEarthNet spans June 2017 - May 2018) and its S1 partner."""
    day = np.datetime64("2017-06-01") + np.timedelta64(int(rng.integers(0, 365)), "D")
    t2 = day.astype("datetime64[s]") + np.timedelta64(int((10.5 - lon / 15) * 3600 + rng.integers(-900, 900)), "s")
    t1 = (day + np.timedelta64(int(rng.integers(0, 2)), "D")).astype("datetime64[s]") + np.timedelta64(
        int((17.5 - lon / 15) * 3600 + rng.integers(-600, 600)), "s")
    s2_tile = f"S2{'AB'[rng.integers(2)]}_MSIL2A_{stamp(t2)}_N9999_R{int(rng.integers(1, 144)):03d}_T{mgrs}"
    s1_tile = f"S1{'AB'[rng.integers(2)]}_IW_GRDH_1SDV_{stamp(t1)}"
    epsg = utm_epsg(lat, lon)
    xs, ys = warp_transform("EPSG:4326", f"EPSG:{epsg}", [lon], [lat])
    # MGRS tiles start at whole 100 km lines (the S2 grid's 40 m overlap margin aside).
    origin = (math.floor(xs[0] / 1e5) * 1e5 - 40.0, math.ceil(ys[0] / 1e5) * 1e5)
    cells = rng.permutation(_GRID * _GRID)
    return _Tile(country, mgrs, s2_tile, s1_tile, epsg, origin, cells, season_of(t2))


def _write_patch(root: Path, seed: int, p: int, tile: _Tile, cell: int, size: int) -> dict:
    """Write patch ``p`` (S2 and S1 folders) at ``cell`` of ``tile``; returns its metadata row, split aside."""
    col, row = cell % _GRID, cell // _GRID
    patch_id = f"{tile.s2_tile}_{col}_{row}"
    s1_name = f"{tile.s1_tile}_{tile.mgrs}_{col}_{row}"
    left = tile.origin[0] + col * _BEN_PATCH_M
    top = tile.origin[1] - row * _BEN_PATCH_M
    crs = f"EPSG:{tile.epsg}"
    scene = draw_scene(keyed_rng(seed, STREAM_SCENE, _BEN_KEY, p), size).crop(size)
    season = (tile.season,)
    refl = render_s2(keyed_rng(seed, STREAM_S2, _BEN_KEY, p), scene, season, "L2A")[0]  # (12, H, W)
    s2_dir = root / BIGEARTHNET_S2_ROOT / tile.s2_tile / patch_id
    for band, file_band, coarse in zip(S2_L2A_BANDS, BIGEARTHNET_S2_BANDS, to_native_resolution(refl, S2_L2A_BANDS)):
        write_tif(s2_dir / f"{patch_id}_{file_band}.tif", encode_s2_tif(coarse), crs,
                  north_up(left, top, S2_RESOLUTION_M[band]))
    db = render_s1(keyed_rng(seed, STREAM_S1, _BEN_KEY, p), scene, season)[0]  # (2, H, W)
    s1_dir = root / BIGEARTHNET_S1_ROOT / tile.s1_tile / s1_name
    for pol, img in zip(S1_BANDS, db):
        write_tif(s1_dir / f"{s1_name}_{pol}.tif", img, crs, north_up(left, top, 10))
    return {"patch_id": patch_id, "labels": bigearthnet_labels(scene.classes), "country": tile.country,
            "s1_name": s1_name, "s2v1_name": f"{tile.s2_tile.split('_N9999_')[0]}_{col}_{row}",
            "contains_seasonal_snow": False, "contains_cloud_or_shadow": False}


def _write_metadata(root: Path, rows: Sequence[dict]) -> Path:
    """``root/metadata.parquet`` with one row per patch, columns in :data:`_SCHEMA` order."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / BIGEARTHNET_METADATA
    columns = {name: [r[name] for r in rows] for name in _SCHEMA.names}
    pq.write_table(pa.table(columns, schema=_SCHEMA), path)
    return path
