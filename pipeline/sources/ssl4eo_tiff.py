"""SSL4EO-S12 v1 GeoTIFF tree.

Layout::

    s1/<7-digit id>/<S1 product id>/{VV,VH}.tif              float32, dB, 10 m
    s2c/<7-digit id>/<S2 product id>/{B1..B12,B8A}.tif       uint16, reflectance × 10000 (L1C)
    s2a/<7-digit id>/<S2 product id>/...                     L2A (12 bands), with --s2-product L2A

Four product folders per modality and location, one per season; S1 and S2 are
paired by acquisition date (the product ids carry it: `pair_by_date`), the pair's
gap in days is recorded and pairs further apart than ``max_pair_gap_days`` are
quarantined (temporal_mismatch). The time index is the pair's date rank. Bands at
20 m and 60 m reach the 10 m grid by nearest neighbour through their georeferencing
(`pipeline.sources.geotiff`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence


from pipeline.inventory import PlannedItems, gathered
from pipeline.shards import Sample, make_key
from pipeline.sources.base import (
    MISSING_PARTNER,
    S1_BANDS,
    TEMPORAL_MISMATCH,
    Rejection,
    Result,
    Source,
    WorkItem,
    date_from_name,
    pair_by_date,
)
from pipeline.sources.geotiff import RESAMPLING, PairFailure, RasterError, center_lonlat, decode, fetch, read_pair
from pipeline.sources.listing import find_all, groups, subfolders
from pipeline.storage import retrying

# Modality folders as published: S1, and one per S2 processing level.
S1_DIR = "s1"
S2_DIRS = {"L1C": "s2c", "L2A": "s2a"}
LOCATIONS_PER_TASK = 500
"""Locations listed by one inventory task: 1,000 folder listings (about 30 s on S3 with 16 in flight), and
2,000 work items; SSL4EO-S12 v1's 251k locations make ~500 tasks."""


class SSL4EOTiff(Source):
    name = "ssl4eo-tiff"
    version = "SSL4EO-S12 v1 (GeoTIFF)"
    split_names = ("train",)

    @property
    def s2_dir(self) -> str:
        return S2_DIRS[self.options.s2_product]

    def available_splits(self) -> list[str]:
        # The GeoTIFF release has no split folders: everything is one split.
        for sub in (S1_DIR, self.s2_dir):
            if not retrying(self.fs.exists)(f"{self.root}/{sub}"):
                other = {d: level for level, d in S2_DIRS.items() if d != self.s2_dir}
                found = [d for d in other if retrying(self.fs.exists)(f"{self.root}/{d}")]
                hint = f"; found {found[0]}/: pass --s2-product {other[found[0]]}" if sub != S1_DIR and found else ""
                raise FileNotFoundError(f"{self.input_url}: no '{sub}/' folder; an SSL4EO-S12 v1 GeoTIFF tree has "
                                        f"{S1_DIR}/ and {self.s2_dir}/{hint}")
        return ["train"]

    def plan(self, split: str, map_fn: Callable) -> tuple[PlannedItems, list[Rejection]]:
        # The driver lists the location folders of both modalities (one level, ~40 bytes a location); the
        # inventory tasks list their products and files (`pipeline.sources.listing`).
        locations = sorted(set(subfolders(self.fs, f"{self.root}/{S1_DIR}"))
                           | set(subfolders(self.fs, f"{self.root}/{self.s2_dir}")))
        if not locations:
            raise FileNotFoundError(f"{self.input_url}: no location folders under {S1_DIR}/ or {self.s2_dir}/")
        return gathered(map_fn(self.inventory_locations, groups(locations, LOCATIONS_PER_TASK)))

    def inventory_locations(self, locations: Sequence[str]) -> tuple[list[WorkItem], list[Rejection]]:
        """The pairs of some locations, from a listing of their folders in both modalities."""
        bases = (f"{self.root}/{S1_DIR}", f"{self.root}/{self.s2_dir}")
        listed = find_all(self.fs, [f"{base}/{loc}" for base in bases for loc in locations])
        items: list[WorkItem] = []
        rejects: list[Rejection] = []
        for loc in locations:
            products = [sorted({rel.split("/")[0] for rel in listed[f"{base}/{loc}"]
                                if rel.count("/") == 1 and rel.lower().endswith((".tif", ".tiff"))})
                        for base in bases]
            its, rej = self._location(loc, *products)
            items.extend(its)
            rejects.extend(rej)
        est = self._estimate_bytes(items)
        for it in items:
            it.est_bytes = est
        return items, rejects

    def _location(self, loc: str, p1: list[str], p2: list[str]) -> tuple[list[WorkItem], list[Rejection]]:
        """The pairs of one location: its S1 and S2 products paired by acquisition date."""
        items: list[WorkItem] = []
        rejects: list[Rejection] = []
        limit = self.options.max_pair_gap_days
        for pair in pair_by_date([date_from_name(p) for p in p1], [date_from_name(p) for p in p2]):
            key = make_key(loc, f"t{pair.rank}")
            if pair.s1 is None or pair.s2 is None:
                have = f"{S1_DIR}/{loc}/{p1[pair.s1]}" if pair.s2 is None else f"{self.s2_dir}/{loc}/{p2[pair.s2]}"
                missing = "S2" if pair.s2 is None else "S1"
                rejects.append(Rejection(self.url(f"{self.root}/{have}"), loc, MISSING_PARTNER,
                                         f"no {missing} product for acquisition {pair.rank} in date order", key, pair.rank))
                continue
            prod1, prod2 = p1[pair.s1], p2[pair.s2]
            if pair.gap_days is not None and pair.gap_days > limit:
                rejects.append(Rejection(self.url(f"{self.root}/{S1_DIR}/{loc}/{prod1}"), loc, TEMPORAL_MISMATCH,
                                         f"S1 {prod1} is {pair.gap_days:g} days from S2 {prod2} "
                                         f"(limit {limit:g})", key, pair.rank))
                continue
            items.append(WorkItem(key, loc, pair.rank, {
                "s1_dir": f"{self.root}/{S1_DIR}/{loc}/{prod1}",
                "s2_dir": f"{self.root}/{self.s2_dir}/{loc}/{prod2}",
                "s1_product": prod1, "s2_product": prod2, "pair_gap_days": pair.gap_days,
            }, 0))
        return items, rejects

    def _estimate_bytes(self, items: Sequence[WorkItem]) -> int:
        """Decoded size of one sample, from the first readable pair (the grid is the same for all)."""
        for it in items[:20]:
            try:
                data = fetch(self.fs, [f"{it.refs['s1_dir']}/VV.tif", f"{it.refs['s2_dir']}/B2.tif"])
                vv, b2 = (decode(v, k) for k, v in data.items())
            except (OSError, RasterError):
                continue
            h, w = b2.data.shape
            return h * w * (2 * vv.data.itemsize + len(self.s2_bands) * b2.data.itemsize) + 2048
        return 2 * 1024 * 1024

    def read(self, items: Sequence[WorkItem], split: str) -> Iterator[Result]:
        for it in items:
            yield self._read_one(it, split)

    def _read_one(self, it: WorkItem, split: str) -> Result:
        d1, d2 = it.refs["s1_dir"], it.refs["s2_dir"]
        s1_paths = [f"{d1}/{b}.tif" for b in S1_BANDS]
        s2_paths = [f"{d2}/{b}.tif" for b in self.s2_bands]

        def reject(url: str, reason: str, detail: str) -> Rejection:
            return Rejection(self.url(url), it.sample_id, reason, detail, it.key, it.time_index)

        got = read_pair(self.fs, s1_paths, s2_paths, self.s2_bands)
        if isinstance(got, PairFailure):
            return reject(got.path, got.reason, got.detail)
        s1, s2, ref = got
        bad = self.check(it, s1, s2, self.url(d2))
        if bad is not None:
            return bad
        lon, lat = center_lonlat(ref)
        meta: dict[str, Any] = {
            "sample_id": it.sample_id,
            "time_index": it.time_index,
            "source": self.name,
            "split": split,
            "lat": lat,
            "lon": lon,
            "crs": ref.crs,
            "timestamps": {"s1": date_from_name(it.refs["s1_product"]), "s2": date_from_name(it.refs["s2_product"])},
            "s1_product": it.refs["s1_product"],
            "s2_product": it.refs["s2_product"],
            "pair_gap_days": it.refs["pair_gap_days"],
            "s1_bands": list(S1_BANDS),
            "s2_bands": list(self.s2_bands),
        }
        return Sample(it.key, s1, s2, meta)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(s2_product=self.options.s2_product, s2_offset="none in this release", resampling=RESAMPLING,
                 pairing=("S1 and S2 products of a location paired by acquisition date (from the product ids): the "
                          "k-th S1 with the k-th S2 in date order, the pairing with the least total gap; time_index "
                          "is that date rank; pair_gap_days in each sample's json"),
                 max_pair_gap_days=self.options.max_pair_gap_days)
        return d
