"""SEN12MS (Schmitt et al. 2019): 180,662 Sentinel-1 / Sentinel-2 / MODIS land-cover patch triplets.

Layout (torchgeo's torchgeo/datasets/sen12ms.py and the dataset's own loader,
schmitt-muc/SEN12MS classification/dataset.py, build the same paths)::

    ROIs{1158_spring,1868_summer,1970_fall,2017_winter}/{s1,s2,lc}_<scene>/
        ROIs<seed>_<season>_{s1,s2,lc}_<scene>_p<patch>.tif
    train_list.txt, test_list.txt      optional: the classification splits, one S2 file name per line

Every file is one multi-band GeoTIFF of 256 x 256 px on a 10 m UTM grid:

* ``s1``: float32, 2 bands, VV and VH backscatter in dB (torchgeo's ``BAND_SETS["s1"]``; its test data
  generator tests/data/sen12ms/data.py writes s1 as float32, s2 and lc as uint16).
* ``s2``: uint16, 13 bands B1..B8, B8A, B9, B10, B11, B12 (L1C, reflectance x 10000, every band already on the
  10 m grid; the loader's 1-based ``S2_BANDS_LD = [2, ..., 9, 12, 13]`` picks B2-B8, B8A, B11, B12 in this order).
* ``lc``: uint16, 4 bands: IGBP, LCCS land cover, LCCS land use, LCCS surface hydrology (torchgeo's docstring);
  band 1 holds the 17 IGBP classes 1..17 (the DFC2020 baseline, lukasliebel/dfc2020_baseline code/datasets.py,
  reads ``lc.read(1)`` through its IGBP table).

Labels follow the SEN12MS scene-classification protocol (Schmitt & Wu 2021; ``load_sample`` in
classification/dataset.py, which sums the patch's IGBP class fractions into the simplified 10-class IGBP
scheme): multi-label = every simplified class covering at least 10 % of the patch (its ``threshold=0.1``),
single-label = the simplified class covering most of it (``argmax``). Fractions are counted here from the
lc patch's IGBP band; the published ``IGBP_probability_labels.pkl`` holds the same coverage fractions.

The published split lists (``train_list.txt``, ``test_list.txt`` in schmitt-muc/SEN12MS splits/, the names
torchgeo downloads into the dataset root) are found in the input root or its ``splits/`` folder and define the
splits ``train`` and ``test``; the patches of a split are exactly its list's entries. Without them every
patch found is one split, ``train``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from pipeline.inventory import PlannedItems, gathered
from pipeline.shards import Sample, make_key
from pipeline.sources.base import (
    BAD_LABELS,
    MISALIGNED,
    MISSING_PARTNER,
    S2_L1C_BANDS,
    UNREADABLE,
    WRONG_BAND_COUNT,
    Rejection,
    Result,
    Source,
    WorkItem,
)
from pipeline.sources.geotiff import (
    Raster,
    RasterError,
    center_lonlat,
    decode_stack,
    fetch,
    footprint_offset_m,
    sample_onto,
)
from pipeline.sources.listing import find_all, groups, subfolders
from pipeline.storage import retrying

SEASON_FOLDERS = ("ROIs1158_spring", "ROIs1868_summer", "ROIs1970_fall", "ROIs2017_winter")
MODALITIES = ("s1", "s2", "lc")
FILE_NAME = "{roi}_{modality}_{scene}_p{patch}.tif"
"""File name of one patch; ``roi`` is the season folder ('ROIs1158_spring'), in folder ``{modality}_{scene}``."""
_ROI = re.compile(r"^ROIs\d+_[a-z]+$")
_SCENE_FOLDER = re.compile(r"^(?P<mod>s1|s2|lc)_(?P<scene>\d+)$")
SCENES_PER_TASK = 4
"""Scenes an inventory task lists (12 folders, ~2,800 patches: SEN12MS's 252 scenes make ~63 tasks)."""
_NAME = re.compile(r"^(?P<roi>ROIs\d+_[a-z]+)_(?P<mod>s1|s2|lc)_(?P<scene>\d+)_p(?P<patch>\d+)\.tif$")
SPLIT_FILES = {"train": "train_list.txt", "test": "test_list.txt"}
LC_BANDS = ("IGBP", "LCCS_LC", "LCCS_LU", "LCCS_SH")

# The 17 IGBP classes, numbered 1..17 in lc band 1.
IGBP_CLASSES = (
    "Evergreen needleleaf forest", "Evergreen broadleaf forest", "Deciduous needleleaf forest",
    "Deciduous broadleaf forest", "Mixed forest", "Closed shrubland", "Open shrubland", "Woody savanna",
    "Savanna", "Grassland", "Permanent wetland", "Cropland", "Urban and built-up",
    "Cropland/natural vegetation mosaic", "Snow and ice", "Barren", "Water bodies",
)
# The simplified IGBP scheme, in label-vector order (names as in the DFC2020 baseline's code/utils.py classnames()).
SIMPLIFIED_IGBP_CLASSES = ("Forest", "Shrubland", "Savanna", "Grassland", "Wetlands", "Croplands", "Urban/Built-up",
                           "Snow/Ice", "Barren", "Water")
# IGBP class (1..17) -> simplified class index (0..9), as load_sample's IGBP_s sums: forests 1-5, shrublands 6-7,
# savannas 8-9, grassland 10, wetland 11, croplands 12 + 14, urban 13, snow 15, barren 16, water 17
# (the same grouping as DFC2020_CLASSES in the DFC2020 baseline's code/datasets.py).
IGBP_TO_SIMPLIFIED = {1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 1, 7: 1, 8: 2, 9: 2, 10: 3, 11: 4, 12: 5, 13: 6, 14: 5,
                      15: 7, 16: 8, 17: 9}
MULTI_LABEL_MIN_PERCENT = 10
"""A simplified class is a multi-label when it covers at least this share of the patch (threshold=0.1)."""


def patch_id(roi: str, scene: str | int, patch: str | int) -> str:
    """'ROIs1158_spring_1_p30': one triplet, named without its modality."""
    return f"{roi}_{int(scene)}_p{int(patch)}"


def simplified_counts(igbp: np.ndarray) -> np.ndarray:
    """Pixels per simplified IGBP class, int64 (10,), from an lc band 1 (H, W) of IGBP codes (others ignored)."""
    per_igbp = np.bincount(igbp.ravel().astype(np.int64), minlength=18)[1:18]
    out = np.zeros(len(SIMPLIFIED_IGBP_CLASSES), dtype=np.int64)
    np.add.at(out, [IGBP_TO_SIMPLIFIED[c] for c in range(1, 18)], per_igbp)
    return out


def scene_labels(igbp: np.ndarray) -> Optional[dict[str, Any]]:
    """The classification labels of one patch, or None if its lc band holds no IGBP class.

    ``label_vector``: 10 zeros and ones (multi-label, >= 10 % coverage, exact on pixel counts);
    ``labels``: their names; ``label`` / ``label_index``: the majority class (first on ties, as argmax).
    """
    counts = simplified_counts(igbp)
    if counts.sum() == 0:
        return None
    vector = [int(100 * c >= MULTI_LABEL_MIN_PERCENT * igbp.size) for c in counts]
    top = int(np.argmax(counts))
    return {"labels": [n for n, v in zip(SIMPLIFIED_IGBP_CLASSES, vector) if v], "label_vector": vector,
            "label": SIMPLIFIED_IGBP_CLASSES[top], "label_index": top}


@dataclass(frozen=True)
class Scene:
    """One scene of a season, as an inventory task takes it."""

    roi: str
    """Season folder, 'ROIs1158_spring'."""
    number: int
    folders: dict[str, str]
    """{modality: folder name as found}; a modality without a folder is looked for as '<modality>_<number>'."""
    wanted: Optional[tuple[str, ...]] = None
    """Patch ids a split list wants from this scene; None: every patch found."""
    list_path: Optional[str] = None
    """That split list (named by the rejection of a listed patch found nowhere)."""

    def folder(self, root: str, modality: str) -> str:
        return f"{root}/{self.roi}/{self.folders.get(modality, f'{modality}_{self.number}')}"


class SEN12MS(Source):
    name = "sen12ms"
    version = "SEN12MS (Schmitt et al. 2019)"
    split_names = ("train", "test")

    @property
    def s2_bands(self) -> tuple[str, ...]:
        return S2_L1C_BANDS

    def _scenes(self) -> dict[tuple[str, int], dict[str, str]]:
        """{(season folder, scene number): {modality: its folder's name}} of every scene folder, in natural order,
        from a listing of the root and of each season folder (one level each: ~1,000 names for the release). The
        names are kept as found: a folder 's1_024' is scene 24 and is listed under its own name."""
        scenes: dict[tuple[str, int], dict[str, str]] = defaultdict(dict)
        for roi in subfolders(self.fs, self.root):
            if _ROI.match(roi):
                for folder in subfolders(self.fs, f"{self.root}/{roi}"):
                    m = _SCENE_FOLDER.match(folder)
                    if m:
                        scenes[(roi, int(m["scene"]))].setdefault(m["mod"], folder)
        return dict(sorted(scenes.items()))

    def inventory_scenes(self, scenes: Sequence[Scene]) -> tuple[list[WorkItem], list[Rejection]]:
        """Items of some scenes, from a listing of their three modality folders."""
        listed = find_all(self.fs, [sc.folder(self.root, mod) for sc in scenes for mod in MODALITIES])
        items, rejects = [], []
        for sc in scenes:
            files: dict[str, dict[str, str]] = defaultdict(dict)
            for mod in MODALITIES:
                folder = sc.folder(self.root, mod)
                for name in listed[folder]:
                    m = _NAME.match(name)  # a file directly in the folder, named for this folder's season and scene
                    if m and m["roi"] == sc.roi and m["mod"] == mod and int(m["scene"]) == sc.number:
                        files[patch_id(sc.roi, sc.number, m["patch"])][mod] = f"{folder}/{name}"
            for pid in sorted(set(files if sc.wanted is None else sc.wanted), key=_natural):
                have = files.get(pid, {})
                missing = [m for m in MODALITIES if m not in have]
                if missing:
                    at = have.get("s2") or next(iter(have.values()), sc.list_path or self.root)
                    rejects.append(Rejection(self.url(at), pid, MISSING_PARTNER,
                                             f"no {', '.join(missing)} file for this patch", make_key(pid)))
                    continue
                items.append(WorkItem(make_key(pid), pid, None, dict(have), 0))
        est = self._estimate_bytes(items)
        for it in items:
            it.est_bytes = est
        return items, rejects

    def _split_lists(self) -> dict[str, str]:
        """{split: path of its list} for the published split lists present."""
        found = {}
        for split, name in SPLIT_FILES.items():
            for path in (f"{self.root}/{name}", f"{self.root}/splits/{name}"):
                if retrying(self.fs.exists)(path):
                    found[split] = path
                    break
        return found

    def available_splits(self) -> list[str]:
        if self.options.s2_product != "L1C":
            raise FileNotFoundError(f"{self.input_url}: SEN12MS has Sentinel-2 L1C only (13 bands); "
                                    f"--s2-product {self.options.s2_product} does not apply")
        lists = self._split_lists()
        if lists:
            return list(lists)
        if not self._scenes():
            raise FileNotFoundError(f"{self.input_url}: no SEN12MS patches "
                                    "(ROIs<seed>_<season>/{s1,s2,lc}_<scene>/ROIs<seed>_<season>_<s1|s2|lc>_<scene>_p<n>.tif)")
        return ["train"]

    def plan(self, split: str, map_fn: Callable) -> tuple[PlannedItems, list[Rejection]]:
        # The driver lists the season and scene folders (and reads the split list); inventory tasks list the
        # scenes' files (`pipeline.sources.listing`). Scenes in natural order, patches in natural order within
        # each: the plan order is the patches' natural order.
        lists = self._split_lists()
        rejects: list[Rejection] = []
        found = self._scenes()
        if lists:
            listed, rejects = self._listed(lists[split])
            by_scene: dict[tuple[str, int], list[str]] = defaultdict(list)
            for pid in listed:
                roi, number, _ = _natural(pid)
                by_scene[(roi, number)].append(pid)
            scenes = [Scene(roi, number, found.get((roi, number), {}), tuple(pids), lists[split])
                      for (roi, number), pids in sorted(by_scene.items())]
        else:
            scenes = [Scene(roi, number, folders) for (roi, number), folders in found.items()]
        return gathered(map_fn(self.inventory_scenes, groups(scenes, SCENES_PER_TASK)), rejects)

    def _listed(self, path: str) -> tuple[list[str], list[Rejection]]:
        """Patch ids of one split list (lines name an s1, s2 or lc file); unparseable lines become rejections."""
        text = retrying(self.fs.cat_file)(path).decode()
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        ids, rejects = [], []
        for line in lines:
            m = _NAME.match(line.rsplit("/", 1)[-1])
            if m:
                ids.append(patch_id(m["roi"], m["scene"], m["patch"]))
            else:
                rejects.append(Rejection(self.url(path), line, UNREADABLE, "not a SEN12MS patch file name"))
        return ids, rejects

    def _estimate_bytes(self, items: Sequence[WorkItem]) -> int:
        for it in items[:20]:
            try:
                s2 = decode_stack(fetch(self.fs, [it.refs["s2"]])[it.refs["s2"]], it.refs["s2"])
            except (OSError, RasterError):
                continue
            h, w = s2.data.shape[-2:]
            return h * w * (len(self.s1_bands) * 4 + len(self.s2_bands) * s2.data.itemsize) + 2048
        return 2 * 1024 * 1024

    def read(self, items: Sequence[WorkItem], split: str) -> Iterator[Result]:
        for it in items:
            yield self._read_one(it, split)

    def _rasters(self, it: WorkItem) -> "dict[str, Raster] | Rejection":
        """The three decoded files of a triplet, checked for band counts and footprints."""
        paths = {m: it.refs[m] for m in MODALITIES}
        try:
            raw = fetch(self.fs, list(paths.values()))
        except OSError as err:
            return Rejection(self.url(paths["s2"]), it.sample_id, UNREADABLE, f"{type(err).__name__}: {err}", it.key)
        rasters = {}
        for m, path in paths.items():
            try:
                rasters[m] = decode_stack(raw[path], path.rsplit("/", 1)[-1])
            except RasterError as err:
                return Rejection(self.url(path), it.sample_id, UNREADABLE, str(err), it.key)
        for m, count in (("s1", len(self.s1_bands)), ("s2", len(self.s2_bands)), ("lc", len(LC_BANDS))):
            if rasters[m].data.shape[0] != count:
                return Rejection(self.url(paths[m]), it.sample_id, WRONG_BAND_COUNT,
                                 f"{m} has {rasters[m].data.shape[0]} bands, expected {count}", it.key)
        pixel = abs(rasters["s2"].res[0])
        for m in ("s1", "lc"):
            offset = footprint_offset_m(rasters[m], rasters["s2"])
            if offset > pixel:
                return Rejection(self.url(paths[m]), it.sample_id, MISALIGNED,
                                 f"{m} and s2 footprints differ by {offset:.1f} m (> one {pixel:g} m pixel)", it.key)
        return rasters

    def _read_one(self, it: WorkItem, split: str) -> Result:
        rasters = self._rasters(it)
        if isinstance(rasters, Rejection):
            return rasters
        ref = rasters["s2"]
        s1, s2, lc = sample_onto(rasters["s1"], ref), ref.data, sample_onto(rasters["lc"], ref)
        bad = self.check(it, s1, s2, self.url(it.refs["s2"]))
        if bad is not None:
            return bad
        labels = scene_labels(lc[0])
        if labels is None:
            return Rejection(self.url(it.refs["lc"]), it.sample_id, BAD_LABELS, "lc band 1 holds no IGBP class (1-17)",
                             it.key)
        lon, lat = center_lonlat(ref)
        name = lambda m: it.refs[m].rsplit("/", 1)[-1][: -len(".tif")]  # noqa: E731
        meta: dict[str, Any] = {
            "sample_id": it.sample_id,
            "time_index": None,
            "source": self.name,
            "split": split,
            "lat": lat,
            "lon": lon,
            "crs": ref.crs,
            "season": it.sample_id.split("_")[1],
            "timestamps": {"s1": None, "s2": None},
            "s1_product": name("s1"),
            "s2_product": name("s2"),
            "s1_bands": list(self.s1_bands),
            "s2_bands": list(self.s2_bands),
            **labels,
        }
        return Sample(it.key, s1, s2, meta)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        lists = self._split_lists()
        d.update(
            s2_product="L1C", s2_offset="none in this release", label_classes=list(SIMPLIFIED_IGBP_CLASSES),
            labels={
                "from": "lc band 1 (IGBP, 17 classes), grouped into the simplified IGBP scheme (10 classes)",
                "label_vector": f"multi-label: classes covering >= {MULTI_LABEL_MIN_PERCENT}% of the patch",
                "label": "single-label: the class covering most of the patch (first on ties)",
            },
            splits=({s: p.rsplit("/", 1)[-1] for s, p in lists.items()} if lists
                    else "no published split lists in the input: every patch in 'train'"),
            resampling="none: every band of the release is on the 10 m grid (s1 / lc sampled onto s2's grid "
                       "by nearest neighbour where a file's grid differs)",
        )
        return d


def _natural(pid: str) -> tuple:
    """Sort key 'ROIs1158_spring_12_p3' -> ('ROIs1158_spring', 12, 3)."""
    roi, scene, patch = pid.rsplit("_", 2)
    return roi, int(scene), int(patch[1:])
