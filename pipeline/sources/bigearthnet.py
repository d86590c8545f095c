"""BigEarthNet v2 (reBEN): Sentinel-1/Sentinel-2 patch pairs with multi-label land cover.

Layout::

    BigEarthNet-S2/<tile>/<patch_id>/<patch_id>_{B01..B12,B8A}.tif   uint16, 12 L2A bands, 120/60/20 px (10/20/60 m)
    BigEarthNet-S1/<s1 tile>/<s1_name>/<s1_name>_{VV,VH}.tif          float32, dB, 120 px
    metadata.parquet                                                   patch_id, s1_name, split, labels, ...

Labels are mapped to the standard 19-class nomenclature (Sumbul et al. 2021);
the older 43-class CORINE names are accepted and mapped with the official table.
Bands reach the 10 m grid through their georeferencing (`pipeline.sources.geotiff`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.inventory import PlannedItems, gathered
from pipeline.shards import Sample, make_key
from pipeline.sources.base import (
    BAD_LABELS,
    MISSING_PARTNER,
    S1_BANDS,
    S2_L2A_BANDS,
    Rejection,
    Result,
    Source,
    WorkItem,
    date_from_name,
)
from pipeline.sources.geotiff import RESAMPLING, PairFailure, RasterError, center_lonlat, decode, fetch, read_pair
from pipeline.sources.listing import subfolders, subfolders_all
from pipeline.storage import retrying

BIGEARTHNET_19_CLASSES = (
    "Urban fabric",
    "Industrial or commercial units",
    "Arable land",
    "Permanent crops",
    "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub",
    "Beaches, dunes, sands",
    "Inland wetlands",
    "Coastal wetlands",
    "Inland waters",
    "Marine waters",
)

# CORINE level-3 names of BigEarthNet v1 (43 classes) → the 19-class nomenclature, as in the
# official conversion table (label_indices.json of git.tu-berlin.de/rsim/BigEarthNet-S2_19-classes_models,
# reproduced as `label_converter` in torchgeo's torchgeo/datasets/bigearthnet.py, commit 029863d).
# None: classes the 19-class nomenclature drops (too rare or not visible at 10 m). "Intertidal
# flats" is one of them: only "Salt marshes" and "Salines" become "Coastal wetlands".
CORINE_43_TO_19: dict[str, Optional[str]] = {
    "Continuous urban fabric": "Urban fabric",
    "Discontinuous urban fabric": "Urban fabric",
    "Industrial or commercial units": "Industrial or commercial units",
    "Road and rail networks and associated land": None,
    "Port areas": None,
    "Airports": None,
    "Mineral extraction sites": None,
    "Dump sites": None,
    "Construction sites": None,
    "Green urban areas": None,
    "Sport and leisure facilities": None,
    "Non-irrigated arable land": "Arable land",
    "Permanently irrigated land": "Arable land",
    "Rice fields": "Arable land",
    "Vineyards": "Permanent crops",
    "Fruit trees and berry plantations": "Permanent crops",
    "Olive groves": "Permanent crops",
    "Annual crops associated with permanent crops": "Permanent crops",
    "Pastures": "Pastures",
    "Complex cultivation patterns": "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation":
        "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas": "Agro-forestry areas",
    "Broad-leaved forest": "Broad-leaved forest",
    "Coniferous forest": "Coniferous forest",
    "Mixed forest": "Mixed forest",
    "Natural grassland": "Natural grassland and sparsely vegetated areas",
    "Sparsely vegetated areas": "Natural grassland and sparsely vegetated areas",
    "Moors and heathland": "Moors, heathland and sclerophyllous vegetation",
    "Sclerophyllous vegetation": "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland/shrub": "Transitional woodland, shrub",
    "Beaches, dunes, sands": "Beaches, dunes, sands",
    "Bare rock": None,
    "Burnt areas": None,
    "Inland marshes": "Inland wetlands",
    "Peatbogs": "Inland wetlands",
    "Salt marshes": "Coastal wetlands",
    "Salines": "Coastal wetlands",
    "Intertidal flats": None,
    "Water courses": "Inland waters",
    "Water bodies": "Inland waters",
    "Coastal lagoons": "Marine waters",
    "Estuaries": "Marine waters",
    "Sea and ocean": "Marine waters",
}


def to_19_classes(labels: Sequence[str]) -> list[str]:
    """Map label names (19-class or 43-class) to sorted 19-class names; KeyError for an unknown name."""
    out = set()
    for name in labels:
        if name in BIGEARTHNET_19_CLASSES:
            out.add(name)
        elif name in CORINE_43_TO_19:
            if CORINE_43_TO_19[name] is not None:
                out.add(CORINE_43_TO_19[name])
        else:
            raise KeyError(name)
    return [c for c in BIGEARTHNET_19_CLASSES if c in out]


def label_vector(labels: Sequence[str]) -> list[int]:
    """19 zeros and ones in the order of BIGEARTHNET_19_CLASSES."""
    present = set(labels)
    return [int(c in present) for c in BIGEARTHNET_19_CLASSES]


def _file_band(band: str) -> str:
    """Canonical band name → BigEarthNet file suffix (B1 → B01, B8A stays)."""
    return band if band == "B8A" else f"B{int(band[1:]):02d}"


# The 12 L2A band suffixes of the file names, in S2_L2A_BANDS order.
S2_FILE_BANDS = tuple(_file_band(b) for b in S2_L2A_BANDS)
# Folders and metadata table as published.
S1_ROOT = "BigEarthNet-S1"
S2_ROOT = "BigEarthNet-S2"
METADATA = "metadata.parquet"
SPLITS = ("train", "validation", "test")
PATCHES_PER_TASK = 2000
"""Metadata rows an inventory task takes: reBEN's 549k patches make ~275 tasks, each listing the one or two S2
tile folders and the few S1 product folders its (sorted) patches fall in."""


def s2_tile(patch_id: str) -> str:
    """The S2 product folder a patch lives in: its id without the trailing _<col>_<row> (reBEN names a patch
    <S2 product>_<col>_<row> and keeps it under BigEarthNet-S2/<S2 product>/; as torchgeo's and the release's
    loaders build the path)."""
    return patch_id.rsplit("_", 2)[0] if patch_id.count("_") >= 2 else ""


def s1_tile(s1_name: str) -> str:
    """The S1 product folder of an S1 patch: its name without the trailing _<mgrs>_<col>_<row> (reBEN names
    it <S1 product>_<mgrs tile>_<col>_<row> under BigEarthNet-S1/<S1 product>/)."""
    return s1_name.rsplit("_", 3)[0] if s1_name.count("_") >= 3 else ""


def _row_groups(rows: pa.Table, size: int) -> Iterator[list[tuple[str, Optional[str], Optional[list[str]]]]]:
    """Consecutive groups of metadata rows as (patch_id, s1_name, labels), made one at a time: the driver never
    holds all rows as Python objects."""
    for lo in range(0, rows.num_rows, size):
        part = rows.slice(lo, size)
        yield list(zip(part["patch_id"].to_pylist(), part["s1_name"].to_pylist(), part["labels"].to_pylist()))


class BigEarthNet(Source):
    name = "bigearthnet"
    version = "BigEarthNet v2.0 (reBEN)"

    @property
    def s2_bands(self) -> tuple[str, ...]:
        return S2_L2A_BANDS

    def _metadata(self) -> pa.Table:
        """The release's metadata table (patch_id, s1_name, split, labels) as Arrow columns: about 180 bytes a
        patch, not the ~1 KB of a row as Python objects."""
        path = f"{self.root}/{METADATA}"
        if not retrying(self.fs.exists)(path):
            raise FileNotFoundError(f"{self.input_url}: no {METADATA}; a BigEarthNet v2 archive has "
                                    f"{METADATA}, {S1_ROOT}/ and {S2_ROOT}/")
        data = retrying(self.fs.cat_file)(path)  # tens of MB for the whole release: read in one retried call
        return pq.read_table(pa.BufferReader(data), columns=["patch_id", "s1_name", "split", "labels"])

    def available_splits(self) -> list[str]:
        found = {s for s in pc.unique(self._metadata()["split"]).to_pylist() if s is not None}
        return [s for s in SPLITS if s in found] + sorted(found - set(SPLITS))

    def plan(self, split: str, map_fn: Callable) -> tuple[PlannedItems, list[Rejection]]:
        # The driver reads the metadata table and lists the two roots' tile folders (one level); each inventory
        # task lists the tile folders its patches live in (`pipeline.sources.listing`) and makes their items.
        if not subfolders(self.fs, f"{self.root}/{S2_ROOT}") and not subfolders(self.fs, f"{self.root}/{S1_ROOT}"):
            raise FileNotFoundError(f"{self.input_url}: no patch folders under {S2_ROOT}/ or {S1_ROOT}/")
        table = self._metadata()
        rows = table.filter(pc.equal(table["split"], split)).sort_by("patch_id")
        return gathered(map_fn(self.inventory_patches, _row_groups(rows, PATCHES_PER_TASK)))

    def inventory_patches(self, rows: Sequence[tuple[str, Optional[str], Optional[list[str]]]]
                          ) -> tuple[list[WorkItem], list[Rejection]]:
        """Items of some metadata rows (patch_id, s1_name, labels): each patch's S2 and S1 folders looked up in a
        listing of the tile folders their names place them in. Folder names only, not the 14 files of each
        patch: a patch folder that exists but lacks a band file is planned, and quarantined when read
        (wrong_band_count, naming the missing file)."""
        base2, base1 = f"{self.root}/{S2_ROOT}", f"{self.root}/{S1_ROOT}"
        s2_dirs = {pid: f"{base2}/{s2_tile(pid)}" for pid, _, _ in rows}
        s1_dirs = {name: f"{base1}/{s1_tile(name)}" for _, name, _ in rows if name}
        listed = {path: set(names) for path, names in
                  subfolders_all(self.fs, sorted(set(s2_dirs.values()) | set(s1_dirs.values()))).items()}
        meta_url = self.url(f"{self.root}/{METADATA}")
        items, rejects = [], []
        for pid, s1_name, labels in rows:
            key = make_key(pid)
            if pid not in listed[s2_dirs[pid]]:
                rejects.append(Rejection(meta_url, pid, MISSING_PARTNER, "no S2 folder", key))
                continue
            if not s1_name or s1_name not in listed[s1_dirs[s1_name]]:
                rejects.append(Rejection(meta_url, pid, MISSING_PARTNER, f"no S1 folder {s1_name}", key))
                continue
            try:
                labels = to_19_classes(list(labels or []))
            except KeyError as err:
                rejects.append(Rejection(meta_url, pid, BAD_LABELS, f"unknown label {err.args[0]!r}", key))
                continue
            items.append(WorkItem(key, pid, None, {
                "s2_dir": f"{s2_dirs[pid]}/{pid}", "s1_dir": f"{s1_dirs[s1_name]}/{s1_name}", "s1_name": s1_name,
                "labels": labels,
            }, 0))
        est = self._estimate_bytes(items)
        for it in items:
            it.est_bytes = est
        return items, rejects

    def _paths(self, it: WorkItem) -> tuple[list[str], list[str]]:
        pid, s1n = it.sample_id, it.refs["s1_name"]
        s1 = [f"{it.refs['s1_dir']}/{s1n}_{b}.tif" for b in S1_BANDS]
        s2 = [f"{it.refs['s2_dir']}/{pid}_{_file_band(b)}.tif" for b in self.s2_bands]
        return s1, s2

    def _estimate_bytes(self, items: Sequence[WorkItem]) -> int:
        for it in items[:20]:
            s1, s2 = self._paths(it)
            try:
                data = fetch(self.fs, [s1[0], s2[1]])
                vv, b2 = decode(data[s1[0]], s1[0]), decode(data[s2[1]], s2[1])
            except (OSError, RasterError):
                continue
            h, w = b2.data.shape
            return h * w * (2 * vv.data.itemsize + len(self.s2_bands) * b2.data.itemsize) + 2048
        return 512 * 1024

    def read(self, items: Sequence[WorkItem], split: str) -> Iterator[Result]:
        for it in items:
            yield self._read_one(it, split)

    def _read_one(self, it: WorkItem, split: str) -> Result:
        s1_paths, s2_paths = self._paths(it)

        def reject(url: str, reason: str, detail: str) -> Rejection:
            return Rejection(self.url(url), it.sample_id, reason, detail, it.key)

        got = read_pair(self.fs, s1_paths, s2_paths, self.s2_bands)
        if isinstance(got, PairFailure):
            return reject(got.path, got.reason, got.detail)
        s1, s2, ref = got
        bad = self.check(it, s1, s2, self.url(it.refs["s2_dir"]))
        if bad is not None:
            return bad
        lon, lat = center_lonlat(ref)
        labels = it.refs["labels"]
        meta: dict[str, Any] = {
            "sample_id": it.sample_id,
            "time_index": None,
            "source": self.name,
            "split": split,
            "lat": lat,
            "lon": lon,
            "crs": ref.crs,
            "timestamps": {"s1": date_from_name(it.refs["s1_name"]), "s2": date_from_name(it.sample_id)},
            "s1_product": it.refs["s1_name"],
            "s2_product": it.sample_id,
            "s1_bands": list(S1_BANDS),
            "s2_bands": list(self.s2_bands),
            "labels": labels,
            "label_vector": label_vector(labels),
        }
        return Sample(it.key, s1, s2, meta)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(s2_product="L2A", s2_offset="none in this release", label_classes=list(BIGEARTHNET_19_CLASSES),
                 resampling=RESAMPLING)
        return d
