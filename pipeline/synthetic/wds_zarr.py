"""WebDataset tars of per-location zipped Zarr stores, as :mod:`pipeline.sources.wds_zarr` reads them.

The writer both release generators share (:mod:`pipeline.synthetic.ssl4eo_wds`,
:mod:`pipeline.synthetic.terramesh`): one member per location and modality, in the
published member format (read by `pipeline.sources.zarr_member`; variable names from
`pipeline.synthetic.published`), the same keys in the same order in every modality's
tar of a shard, and deliberate defects on request so that tests can count the
quarantine against what was written.

Defects (each applied to one location, named in the returned inventory):

* ``unreadable``: its S2 members are cut in half (not a zip any more): every time step lost.
* ``missing_partner``: no S1 member: every time step lost.
* ``wrong_shape``: its S2 grid is 6 pixels smaller than its S1 grid: every time step lost.
* ``non_finite``: NaN in a row of its S1 VV band at time 0: that time step lost.
* ``all_nodata``: its S2 bands are all 0 (no-data) at time 0: that time step lost.
"""

from __future__ import annotations

import io
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from pipeline.synthetic.geo import Location
from pipeline.synthetic.published import (
    BAND,
    BANDS,
    CENTER_LAT,
    CENTER_LON,
    CLOUD_MASK,
    CRS,
    FILE_ID,
    MEMBER_EXT,
    S1_BANDS,
    S2_L1C_BANDS,
    S2_L2A_BANDS,
    S2_NODATA,
    SAMPLE,
    TIME,
    WDS_S2_LEVEL_FOLDERS as S2_LEVEL_FOLDERS,
)
from pipeline.synthetic.scene import STREAM_S1, STREAM_S2, WATER, keyed_rng, render_s1, render_s2, resample_to_10m

DEFECTS = {"unreadable": "unreadable", "missing_partner": "missing_partner", "wrong_shape": "wrong_shape",
           "non_finite": "non_finite", "all_nodata": "all_nodata"}
"""Defect kind -> the quarantine reason (``reason`` of quarantine.jsonl) it must cause, written out here
rather than taken from the readers so that a reader giving another reason fails the release tests."""
_WHOLE_LOCATION = {"unreadable", "missing_partner", "wrong_shape"}
_S2_BANDS = {folder: S2_L1C_BANDS if level == "L1C" else S2_L2A_BANDS for level, folder in S2_LEVEL_FOLDERS.items()}
_LEVEL_OF = {folder: level for level, folder in S2_LEVEL_FOLDERS.items()}
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # no wall-clock time in the files: same arguments, same bytes
_TIME_ENCODING = {"units": "nanoseconds since 1970-01-01", "calendar": "proleptic_gregorian", "dtype": "int64"}


@dataclass(frozen=True)
class Planned:
    """One location of a shard: its member key, where it is, and which of its 4 seasons it keeps."""

    key: str
    loc: Location
    times: tuple[int, ...]
    """Season indices stored as the member's time axis, in date order."""
    sample: str
    """The member's ``sample`` value."""


def file_band(band: str) -> str:
    """Canonical band name -> the releases' band coordinate: B1 -> B01, B8A stays, VV -> vv."""
    if band in S1_BANDS:
        return band.lower()
    return band if band == "B8A" else f"B{int(band[1:]):02d}"


def lost_samples(kind: str, times: int) -> int:
    """How many samples (location x time step) a defect of ``kind`` costs."""
    return times if kind in _WHOLE_LOCATION else 1


def render(seed: int, loc: Location, folders: Sequence[str], size: int) -> dict[str, np.ndarray]:
    """Encoded (4, C, size, size) cubes per product folder: S1 float16 dB, S2 int16 reflectance x 10000 (no offset)."""
    scene = loc.scene.crop(size)
    seasons = loc.acquisitions.seasons
    out = {}
    for folder in folders:
        if folder.startswith("S1"):  # GRD and RTC alike: backscatter in dB
            out[folder] = render_s1(keyed_rng(seed, STREAM_S1, loc.id), scene, seasons).astype(np.float16)
        else:  # same generator state for both levels: same surface, same sensor noise
            level = _LEVEL_OF[folder]
            refl = resample_to_10m(render_s2(keyed_rng(seed, STREAM_S2, loc.id), scene, seasons, level),
                                   _S2_BANDS[folder])
            out[folder] = np.clip(np.rint(refl), S2_NODATA + 1, np.iinfo(np.int16).max).astype(np.int16)
    return out


def member_dataset(p: Planned, folder: str, cube: np.ndarray):
    """The xarray Dataset of one member: ``cube`` (T, C, H, W) for the season indices ``p.times``."""
    import xarray as xr
    from rasterio.crs import CRS as RasterioCRS

    s1 = folder.startswith("S1")
    acq = p.loc.acquisitions
    idx = list(p.times)
    fp = p.loc.footprint
    h, w = cube.shape[-2:]
    data = {
        BANDS: (("time", "band", "y", "x"), cube),
        CENTER_LAT: ((), p.loc.center_lat),
        CENTER_LON: ((), p.loc.center_lon),
        CRS: ((), np.int64(fp.epsg)),
        FILE_ID: (("time",), np.array([(acq.s1_ids if s1 else acq.s2_ids)[i] for i in idx])),
    }
    if not s1:  # scene classification as in the published optical members: 0 land, 1 water
        water = (p.loc.scene.crop(fp.size).classes[:h, :w] == WATER).astype(np.uint8)
        data[CLOUD_MASK] = (("time", "y", "x"), np.repeat(water[None], len(idx), axis=0))
    bands = S1_BANDS if s1 else _S2_BANDS[folder]
    return xr.Dataset(data, coords={
        BAND: np.array([file_band(b) for b in bands]),
        TIME: (acq.s1_time if s1 else acq.s2_time)[idx],
        "y": fp.y_centres()[:h],
        "x": fp.x_centres()[:w],
        SAMPLE: p.sample,
        "spatial_ref": ((), np.int64(0), {"crs_wkt": RasterioCRS.from_epsg(fp.epsg).to_wkt()}),
    })


def member_bytes(ds) -> bytes:
    """``ds`` as a zipped Zarr v2 store with consolidated metadata, byte-reproducibly (fixed entry dates, sorted)."""
    import zarr

    entries: dict = {}
    ds.to_zarr(zarr.storage.MemoryStore(store_dict=entries), zarr_format=2, consolidated=True, mode="w",
               encoding={TIME: dict(_TIME_ENCODING)}, write_empty_chunks=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(entries):
            info = zipfile.ZipInfo(key, date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.create_system = 3
            zf.writestr(info, entries[key].to_bytes())
    return buf.getvalue()


def write_tar(path: Path, members: Sequence[tuple[str, bytes]]) -> None:
    """An uncompressed tar of ``members`` (name, bytes) in order, with no time, user or group in its headers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(path)


def write_shard(root: Path, split: str, name: str, planned: Sequence[Planned], folders: Sequence[str],
                seed: int, size: int, defects: Mapping[str, str]) -> dict[str, str]:
    """Write the tar named ``name`` in every product folder of ``folders``; returns {folder: path}.

    ``folders``: the shard's S1 folder first, then its S2 folders. ``defects``: {member key: kind}."""
    members: dict[str, list[tuple[str, bytes]]] = {f: [] for f in folders}
    for p in planned:
        kind = defects.get(p.key)
        for folder, cube in render(seed, p.loc, folders, size).items():
            data = _member(p, folder, cube[list(p.times)], kind)
            if data is not None:
                members[folder].append((f"{p.key}.{MEMBER_EXT}", data))
    paths = {}
    for folder, items in members.items():
        path = root / split / folder / name
        write_tar(path, items)
        paths[folder] = str(path)
    return paths


def _member(p: Planned, folder: str, cube: np.ndarray, kind: Optional[str]) -> Optional[bytes]:
    """The bytes of one member with the defect ``kind`` (None: none) applied; None when the defect drops it."""
    s1 = folder.startswith("S1")
    if kind == "missing_partner" and s1:
        return None
    if kind == "non_finite" and s1:
        cube = cube.copy()
        cube[0, 0, 0, :] = np.nan
    if kind == "all_nodata" and not s1:
        cube = cube.copy()
        cube[0] = S2_NODATA
    if kind == "wrong_shape" and not s1:
        cube = cube[..., :-6, :-6]
    data = member_bytes(member_dataset(p, folder, cube))
    return data[: len(data) // 2] if kind == "unreadable" and not s1 else data


def assign_defects(keys: Sequence[str], defects: Sequence[str]) -> dict[str, str]:
    """{member key: kind}: the i-th defect goes to the i-th key (one location each)."""
    unknown = sorted(set(defects) - set(DEFECTS))
    if unknown:
        raise ValueError(f"unknown defects {unknown}; choose from {sorted(DEFECTS)}")
    if len(defects) > len(keys):
        raise ValueError(f"{len(defects)} defects need as many locations in the first split, it has {len(keys)}")
    return dict(zip(keys, defects))


def quarantine_counts(defects: Mapping[str, str], times: int) -> dict[str, int]:
    """{reason: samples} the defects cost."""
    out: dict[str, int] = {}
    for kind in defects.values():
        out[DEFECTS[kind]] = out.get(DEFECTS[kind], 0) + lost_samples(kind, times)
    return out
