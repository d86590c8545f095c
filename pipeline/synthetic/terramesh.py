"""TerraMesh: majortom and ssl4eos12 WebDataset tars of one-time-step zipped Zarr members.

Read by :mod:`pipeline.sources.terramesh`; the S1 folder per subset and the shard names as
published (:mod:`pipeline.synthetic.published`); the members are written by :mod:`pipeline.synthetic.wds_zarr`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from pipeline.synthetic.geo import location
from pipeline.synthetic.published import (
    TERRAMESH_S1_FOLDERS as S1_FOLDERS,
    TERRAMESH_SHARD_NAME as SHARD_NAME,
    WDS_S2_LEVEL_FOLDERS as S2_LEVEL_FOLDERS,
)
from pipeline.synthetic.scene import STREAM_ARCHIVE, check_size, keyed_rng
from pipeline.synthetic.wds_zarr import Planned, assign_defects, quarantine_counts, write_shard

TERRAMESH_SUBSETS = ("majortom", "ssl4eos12")
"""Subsets in shard-number order: majortom shards come first in each split, then ssl4eos12."""


def make_terramesh(root: str | Path, splits: Mapping[str, Mapping[str, int]] | None = None,
                   samples_per_shard: int = 3, size: int = 48, seed: int = 0,
                   s2_folders: Sequence[str] = tuple(S2_LEVEL_FOLDERS.values()), defects: Sequence[str] = ()) -> dict:
    """Write a TerraMesh archive.

    Layout: ``root/{split}/{S1RTC,S1GRD,S2L1C,S2L2A}/{majortom,ssl4eos12}_shard_{NNNNNN}.tar``;
    numbers run from 000001 over the majortom shards, then on over the ssl4eos12 shards
    (as in the release). S1RTC holds the majortom tars and S1GRD the ssl4eos12 ones; the
    S2 folders hold both. Members ``<subset>_<split>_<7-digit id>.zarr.zip``, same keys
    and order in each product's tar; each member is one location at one of its seasons
    (time dimension 1, ``sample`` = "<id>_<season>"), otherwise in the SSL4EO-S12 member
    format (see :func:`pipeline.synthetic.ssl4eo_wds.make_ssl4eo_wds`).

    ``splits``: {split: {subset: shards}}, default {"train": {"majortom": 1, "ssl4eos12": 1},
    "val": {"ssl4eos12": 1}}. ``defects``: as for the SSL4EO-S12 writer. Returns the same
    inventory, with "subset" per shard name.
    """
    check_size(size)
    splits = {"train": {"majortom": 1, "ssl4eos12": 1}, "val": {"ssl4eos12": 1}} if splits is None else splits
    root = Path(root)
    next_id = int(keyed_rng(seed, STREAM_ARCHIVE).integers(0, 150_000))
    result: dict = {"root": str(root), "size": size, "times": 1, "products": [*S1_FOLDERS.values(), *s2_folders],
                    "splits": {}, "defects": {}, "quarantine": {}}
    for n, (split, subsets) in enumerate(splits.items()):
        shards = []  # (name, subset, planned)
        for subset in TERRAMESH_SUBSETS:
            for _ in range(subsets.get(subset, 0)):
                planned = []
                for i in range(next_id, next_id + samples_per_shard):
                    loc = location(seed, i, size)
                    season = i % 4  # one season per sample, as TerraMesh keeps one time step
                    planned.append(Planned(f"{subset}_{split}_{i:07d}", loc, (season,), f"{loc.name}_{season}"))
                next_id += samples_per_shard
                shards.append((SHARD_NAME.format(subset=subset, number=len(shards) + 1), subset, planned))
        chosen = assign_defects([p.key for _, _, planned in shards for p in planned], defects) if n == 0 else {}
        result["splits"][split] = {
            "shards": {name: write_shard(root, split, name, planned, [S1_FOLDERS[subset], *s2_folders], seed, size,
                                         chosen) for name, subset, planned in shards},
            "members": {name: [p.key for p in planned] for name, _, planned in shards},
            "subset": {name: subset for name, subset, _ in shards},
            "samples": sum(len(planned) for _, _, planned in shards),
        }
        result["defects"].update(chosen)
        result["quarantine"][split] = quarantine_counts(chosen, 1)
    return result
