"""The two forms a Zarr file of SSL4EO-S12 v1.1 may hold its metadata in read alike.

The dataset card lists the per-sample metadata (``center_lat``, ``crs``, ``file_id``, ``time_``, ...) as data
variables with bands 'B01' .. 'B8A', 'vv', 'vh' and ``crs`` an int64 EPSG code; other listings show them as
coordinates, with 'B1' / 'VV' and 'EPSG:326zz' strings. The readers accept either (`ssl4eo_zarr`,
`zarr_member`); here the same locations written in both forms must give the same samples, metadata included,
for the chunk-file release (`ssl4eo-zarr`) and for one location's member of the WebDataset releases.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import xarray as xr

from pipeline import synthetic
from pipeline.shards import Sample
from pipeline.sources import SOURCES, SourceOptions
from pipeline.sources.ssl4eo_zarr import open_zarr_zip
from pipeline.sources.zarr_member import _decode_direct, _decode_xarray, _entries, _open, decode_member
from pipeline.sources.zarr_v2 import ArrayReader
from pipeline.storage import url_to_fs


def _read(root: str) -> tuple[list, list]:
    """Plan and read the train split in this process: ([(key, s1 bytes, s2 bytes, meta)], [rejection])."""
    reader = SOURCES["ssl4eo-zarr"](root, SourceOptions())
    items, rejects = reader.plan("train", lambda fn, args: [fn(a) for a in args])
    out, rejected = [], [r.to_dict() for r in rejects]
    for r in reader.read(list(items), "train"):
        if isinstance(r, Sample):
            out.append((r.key, r.s1.dtype.str, r.s1.tobytes(), r.s2.dtype.str, r.s2.tobytes(), r.meta))
        else:
            rejected.append(r.to_dict())
    return out, rejected


def test_the_chunk_file_release_reads_alike_in_both_forms(tmp_path):
    kw = dict(splits={"train": 1}, samples_per_file=2, size=24, seed=5)
    released = synthetic.make_ssl4eo_zarr(str(tmp_path / "release"), **kw)
    other = synthetic.make_ssl4eo_zarr(str(tmp_path / "coords"), form="coordinates", **kw)
    # the files really differ in form: where the metadata sit, how bands and crs are spelt
    fs, _ = url_to_fs(str(tmp_path))
    for files, coord, bands, crs in ((released, False, ["B01", "B02"], np.int64),
                                     (other, True, ["B1", "B2"], np.str_)):
        ds = open_zarr_zip(fs, files["splits"]["train"]["files"]["S2L1C"][0])
        assert ("center_lat" in ds.coords) is coord and ("file_id" in ds.coords) is coord
        assert [str(b) for b in ds["band"].values[:2]] == bands and isinstance(ds["crs"].values[0], crs)
    want, rejected = _read(str(tmp_path / "release"))
    assert len(want) == 2 * 4 and rejected == []
    assert want[0][5]["crs"].startswith("EPSG:326") or want[0][5]["crs"].startswith("EPSG:327")
    assert _read(str(tmp_path / "coords")) == (want, [])


def _member_forms() -> tuple[bytes, bytes]:
    """One S2 location member as the WebDataset release writes it, and the same in the other form."""
    from pipeline.synthetic import wds_zarr

    planned = wds_zarr.Planned("k", synthetic.geo.location(3, 7, 24), (0, 1, 2, 3), "0000007")
    folder = "S2L1C"
    cube = wds_zarr.render(3, planned.loc, [folder], 24)[folder]
    ds = wds_zarr.member_dataset(planned, folder, cube)
    other = ds.assign_coords(band=[wds_zarr.file_band(b).upper().replace("B0", "B") for b in
                                   synthetic.published.S2_L1C_BANDS],
                             crs=xr.DataArray(f"EPSG:{planned.loc.footprint.epsg}"))
    other = other.set_coords([n for n in other.data_vars if n not in ("bands", "cloud_mask")])
    assert "center_lat" in other.coords and "center_lat" not in ds.coords
    return wds_zarr.member_bytes(ds), wds_zarr.member_bytes(other)


def _fields(location) -> dict:
    d = dataclasses.asdict(location)
    d["bands"] = (d["bands"].dtype.str, d["bands"].shape, d["bands"].tobytes())
    return d


@pytest.mark.parametrize("path", ["chosen", "direct", "xarray"])
def test_a_webdataset_member_reads_alike_in_both_forms(path):
    decode = {"chosen": decode_member, "direct": lambda b: _decode_direct(ArrayReader(_entries(b))),
              "xarray": lambda b: _decode_xarray(_open(_entries(b)))}[path]
    released, other = (decode(b) for b in _member_forms())
    assert released.band_names[:2] == ["B1", "B2"] and released.crs.startswith("EPSG:32")
    assert None not in (released.lat, released.lon) and None not in released.times
    assert _fields(other) == _fields(released)
