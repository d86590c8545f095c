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

import pyarrow.parquet as pq

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


class BigEarthNet(Source):
    name = "bigearthnet"
    version = "BigEarthNet v2.0 (reBEN)"

    @property
    def s2_bands(self) -> tuple[str, ...]:
        return S2_L2A_BANDS

    def _metadata(self):
        path = f"{self.root}/{METADATA}"
        if not self.fs.exists(path):
            raise FileNotFoundError(f"{self.input_url}: no {METADATA}; a BigEarthNet v2 archive has "
                                    f"{METADATA}, {S1_ROOT}/ and {S2_ROOT}/")
        with self.fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["patch_id", "s1_name", "split", "labels"])
        return table.to_pylist()

    def available_splits(self) -> list[str]:
        found = {row["split"] for row in self._metadata()}
        return [s for s in SPLITS if s in found] + sorted(found - set(SPLITS))

    def _folders(self, sub: str) -> dict[str, str]:
        """{patch folder name: folder path} from one recursive listing of ``sub``."""
        base = f"{self.root}/{sub}"
        if not self.fs.exists(base):
            return {}
        out: dict[str, str] = {}
        for path in self.fs.find(base):
            rel = path[len(base) :].strip("/").split("/")
            if len(rel) == 3:
                out[rel[1]] = f"{base}/{rel[0]}/{rel[1]}"
        return out

    def plan(self, split: str, map_fn: Callable) -> tuple[list[WorkItem], list[Rejection]]:
        rows = [r for r in self._metadata() if r["split"] == split]
        s2_dirs = self._folders(S2_ROOT)
        s1_dirs = self._folders(S1_ROOT)
        if not s2_dirs and not s1_dirs:
            raise FileNotFoundError(f"{self.input_url}: no patch folders under {S2_ROOT}/ or {S1_ROOT}/")
        meta_url = self.url(f"{self.root}/{METADATA}")
        items, rejects = [], []
        for row in sorted(rows, key=lambda r: r["patch_id"]):
            pid, s1_name = row["patch_id"], row["s1_name"]
            key = make_key(pid)
            if pid not in s2_dirs or s1_name not in s1_dirs:
                missing = "S2 folder" if pid not in s2_dirs else f"S1 folder {s1_name}"
                rejects.append(Rejection(meta_url, pid, MISSING_PARTNER, f"no {missing}", key))
                continue
            try:
                labels = to_19_classes(list(row["labels"] or []))
            except KeyError as err:
                rejects.append(Rejection(meta_url, pid, BAD_LABELS, f"unknown label {err.args[0]!r}", key))
                continue
            items.append(WorkItem(key, pid, None, {
                "s2_dir": s2_dirs[pid], "s1_dir": s1_dirs[s1_name], "s1_name": s1_name, "labels": labels,
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
