"""SSL4EO-S12 v1.1 as its dataset repository serves it: WebDataset tars of per-location zipped Zarr stores.

Read by :mod:`pipeline.sources.ssl4eo_wds`; folders and shard names as published
(:mod:`pipeline.synthetic.published`); the members are written by :mod:`pipeline.synthetic.wds_zarr`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from pipeline.synthetic.geo import location
from pipeline.synthetic.published import (
    SSL4EO_WDS_S1_FOLDER as S1_FOLDER,
    SSL4EO_WDS_SHARD_NAME as SHARD_NAME,
    SSL4EO_WDS_TIMES as TIMES,
    WDS_S2_LEVEL_FOLDERS as S2_LEVEL_FOLDERS,
)
from pipeline.synthetic.scene import STREAM_ARCHIVE, check_size, keyed_rng
from pipeline.synthetic.wds_zarr import Planned, assign_defects, quarantine_counts, write_shard

SSL4EO_WDS_PRODUCTS = (S1_FOLDER, *S2_LEVEL_FOLDERS.values())


def make_ssl4eo_wds(root: str | Path, splits: Mapping[str, int] | None = None, samples_per_shard: int = 3,
                    size: int = 48, seed: int = 0, products: Sequence[str] = SSL4EO_WDS_PRODUCTS,
                    defects: Sequence[str] = ()) -> dict:
    """Write an SSL4EO-S12 v1.1 WebDataset archive.

    Layout: ``root/{split}/{S1GRD,S2L1C,S2L2A}/ssl4eos12_shard_{NNNNNN}.tar``, NNNNNN from
    000001 per split; each tar holds ``samples_per_shard`` members ``<key>.zarr.zip``,
    key ``ssl4eos12_<split>_<7-digit location id>`` (the member naming of the TerraMesh
    card's example, whose ssl4eos12 subset comes from this release; its own card is
    silent), the same keys in the same order in every product's tar.

    Each member: ``bands`` (time=4, band, y=size, x=size), S2 int16 reflectance x 10000
    (no offset, 0 = no-data, never written), 13 bands (L1C) or 12 (L2A) named B01..B12,
    B8A; S1 float16 dB, bands vv, vh; ``time`` (4,) datetime64[ns] in date order,
    ``center_lat``/``center_lon`` float64 scalars, ``crs`` int64 EPSG code, ``file_id`` (4,)
    product ids, ``sample`` (the location id), ``x``/``y`` UTM pixel centres,
    ``spatial_ref`` (crs_wkt); S2 members add ``cloud_mask`` (4, y, x) uint8.

    ``splits``: shards per split, default {"train": 2, "val": 1}. ``defects``: kinds of
    :data:`pipeline.synthetic.wds_zarr.DEFECTS`, one location each, the first locations
    of the first split. Returns {"root", "size", "times", "products", "splits": {split:
    {"shards": {name: {folder: path}}, "members": {name: [key, ...]}, "samples": n}},
    "defects": {key: kind}, "quarantine": {split: {reason: samples}}}.
    """
    check_size(size)
    splits = {"train": 2, "val": 1} if splits is None else dict(splits)
    unknown = set(products) - set(SSL4EO_WDS_PRODUCTS)
    if unknown:
        raise ValueError(f"unknown products {sorted(unknown)}; choose from {SSL4EO_WDS_PRODUCTS}")
    folders = [p for p in SSL4EO_WDS_PRODUCTS if p in products]
    root = Path(root)
    next_id = int(keyed_rng(seed, STREAM_ARCHIVE).integers(0, 150_000))
    result: dict = {"root": str(root), "size": size, "times": TIMES, "products": folders, "splits": {},
                    "defects": {}, "quarantine": {}}
    for n, (split, n_shards) in enumerate(splits.items()):
        planned = [_locations(split, range(next_id + s * samples_per_shard, next_id + (s + 1) * samples_per_shard),
                              size, seed) for s in range(n_shards)]
        next_id += n_shards * samples_per_shard
        chosen = assign_defects([p.key for shard in planned for p in shard], defects) if n == 0 else {}
        names = [SHARD_NAME.format(number=s + 1) for s in range(n_shards)]
        result["splits"][split] = {
            "shards": {name: write_shard(root, split, name, shard, folders, seed, size, chosen)
                       for name, shard in zip(names, planned)},
            "members": {name: [p.key for p in shard] for name, shard in zip(names, planned)},
            "samples": n_shards * samples_per_shard * TIMES,
        }
        result["defects"].update(chosen)
        result["quarantine"][split] = quarantine_counts(chosen, TIMES)
    return result


def _locations(split: str, ids: range, size: int, seed: int) -> list[Planned]:
    """The locations ``ids`` of one shard, all four seasons each."""
    return [Planned(f"ssl4eos12_{split}_{loc.name}", loc, tuple(range(TIMES)), loc.name)
            for loc in (location(seed, i, size) for i in ids)]
