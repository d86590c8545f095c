"""The direct Zarr v2 reader (`pipeline.sources.zarr_v2`) gives what xarray gives, member by member, and hands
xarray every store it cannot read exactly as xarray would."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from numcodecs import Delta

from pipeline import synthetic
from pipeline.sources import zarr_member
from pipeline.sources.zarr_member import _decode_direct, _decode_xarray, _entries, decode_member, open_member
from pipeline.sources.zarr_v2 import ArrayReader, Unsupported


def _members(root: Path) -> dict[str, bytes]:
    from webdataset.tariterators import tar_file_iterator

    out = {}
    for tar in sorted(root.rglob("*.tar")):
        with open(tar, "rb") as f:
            for r in tar_file_iterator(f):
                out[f"{tar.relative_to(root)}/{r['fname']}"] = r["data"]
    return out


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Every member of an SSL4EO-S12 WebDataset archive (S1GRD, S2L1C, S2L2A) and of a TerraMesh one (S1RTC,
    S1GRD, S2L1C, S2L2A, one time step), the defective ones included."""
    base = tmp_path_factory.mktemp("members")
    synthetic.make_ssl4eo_wds(base / "ssl4eo", splits={"train": 1}, samples_per_shard=6, size=24, seed=1,
                              defects=("unreadable", "wrong_shape", "non_finite", "all_nodata"))
    synthetic.make_terramesh(base / "terramesh", size=24, seed=2)
    return _members(base)


def _same(a: zarr_member.Location, b: zarr_member.Location) -> None:
    assert a.bands.dtype == b.bands.dtype and a.bands.shape == b.bands.shape
    np.testing.assert_array_equal(a.bands, b.bands)  # NaN where NaN: the non_finite members hold some
    assert (a.band_names, a.times, a.file_ids, a.crs) == (b.band_names, b.times, b.file_ids, b.crs)
    assert (a.lat, a.lon) == (b.lat, b.lon)


def test_every_member_reads_the_same_directly_and_through_xarray(members):
    read = failed = 0
    for name, data in members.items():
        try:
            expected = _decode_xarray(open_member(data))
        except Exception as err:  # a damaged member: the direct reader must not read it either
            with pytest.raises(Exception):
                _decode_direct(ArrayReader(_entries(data)))
            with pytest.raises(type(err)):  # and decode_member says what xarray says
                decode_member(data)
            failed += 1
            continue
        _same(_decode_direct(ArrayReader(_entries(data))), expected)  # the direct path, not a fallback
        _same(decode_member(data), expected)
        read += 1
    assert read > 30 and failed >= 1  # every product of both releases, and the unreadable defect


def _store(encoding: dict | None = None, attrs: dict | None = None) -> bytes:
    """A member written by xarray's own zarr writer with extra ``encoding`` / ``attrs`` on ``bands``."""
    import xarray as xr
    import zarr

    bands = np.arange(2 * 2 * 3 * 3, dtype=np.int16).reshape(2, 2, 3, 3)
    ds = xr.Dataset({"bands": (("time", "band", "y", "x"), bands, attrs or {})},
                    coords={"band": ["vv", "vh"], "time": np.array(["2020-01-01", "2020-02-01"], "datetime64[ns]")})
    entries: dict = {}
    ds.to_zarr(zarr.storage.MemoryStore(store_dict=entries), zarr_format=2, consolidated=True, mode="w",
               encoding={"bands": {"chunks": (1, 1, 2, 2), **(encoding or {})}})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for key in sorted(entries):
            zf.writestr(key, entries[key].to_bytes())
    return buf.getvalue()


def _fortran(data: bytes) -> bytes:
    """The same store with ``bands`` chunks in Fortran order (xarray's writer has no such option)."""
    import numcodecs

    entries = _entries(data)
    zarray = json.loads(bytes(entries["bands/.zarray"]))
    codec = numcodecs.get_codec(zarray["compressor"])
    for key in [k for k in entries if k.startswith("bands/") and not k.split("/")[1].startswith(".")]:
        chunk = np.frombuffer(codec.decode(entries[key]), zarray["dtype"]).reshape(zarray["chunks"])
        entries[key] = codec.encode(np.asfortranarray(chunk).tobytes(order="F"))
    zarray["order"] = "F"
    meta = json.loads(bytes(entries[".zmetadata"]))
    meta["metadata"]["bands/.zarray"] = zarray
    entries["bands/.zarray"], entries[".zmetadata"] = json.dumps(zarray).encode(), json.dumps(meta).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for key in sorted(entries):
            zf.writestr(key, entries[key])
    return buf.getvalue()


@pytest.mark.parametrize("layout", ["C order, blosc", "F order", "no compressor"])
def test_chunks_across_edges_and_times_read_directly(layout):
    data = {"C order, blosc": lambda: _store(), "F order": lambda: _fortran(_store()),
            "no compressor": lambda: _store({"compressors": None})}[layout]()
    zarray = json.loads(bytes(_entries(data)["bands/.zarray"]))
    assert (zarray["order"], zarray["compressor"] is None) == {"C order, blosc": ("C", False), "F order": ("F", False),
                                                              "no compressor": ("C", True)}[layout]
    direct = _decode_direct(ArrayReader(_entries(data)))
    _same(direct, _decode_xarray(open_member(data)))
    assert direct.times == ["2020-01-01T00:00:00Z", "2020-02-01T00:00:00Z"] and direct.band_names == ["VV", "VH"]


@pytest.mark.parametrize("encoding, attrs, why", [
    ({"_FillValue": 0}, None, "fill_value"),  # xarray masks the fill value: floats with NaN
    (None, {"scale_factor": 0.5}, "decoded by xarray"),
    ({"filters": [Delta(dtype="<i2")]}, None, "filters"),
])
def test_what_xarray_would_decode_is_left_to_xarray(encoding, attrs, why):
    data = _store(encoding, attrs)
    with pytest.raises(Unsupported, match=why):
        _decode_direct(ArrayReader(_entries(data)))
    _same(decode_member(data), _decode_xarray(open_member(data)))  # the fallback gives xarray's answer


def test_a_missing_chunk_or_metadata_is_left_to_xarray():
    entries = _entries(_store())
    del entries["bands/1.1.1.1"]
    with pytest.raises(Unsupported, match="missing"):
        ArrayReader(entries).read("bands")
    entries = _entries(_store())
    meta = json.loads(bytes(entries.pop(".zmetadata")))
    assert "bands/.zarray" in meta["metadata"]
    with pytest.raises(Unsupported, match="consolidated"):
        ArrayReader(entries)


# -- stores made to differ: each must read as xarray reads it, or be left to xarray ------------------------------


def _zip(entries: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for key in sorted(entries):
            value = entries[key]
            zf.writestr(key, bytes(value) if isinstance(value, (bytes, memoryview)) else value.to_bytes())
    return buf.getvalue()


def _member(bands=None, time=None, extra=None, coords=None) -> bytes:
    """A member written by xarray's zarr writer: ``bands`` (T, 2, 3, 3), its times, product ids, centre, CRS."""
    import xarray as xr
    import zarr

    bands = np.arange(2 * 2 * 3 * 3, dtype=np.int16).reshape(2, 2, 3, 3) if bands is None else bands
    data = {"bands": (("time", "band", "y", "x"), bands), "center_lat": ((), 45.5), "center_lon": ((), 7.25),
            "crs": ((), np.int64(32633)),
            "file_id": (("time",), np.array(["S1A_IW_GRDH_1SDV_20200101T000000_x", "S1A_IW_GRDH_1SDV_20200201T000000_y"]))}
    data.update(extra or {})
    ds = xr.Dataset(data, coords={"band": ["vv", "vh"], "x": [0.5, 1.5, 2.5], "y": [2.5, 1.5, 0.5],
                                  "time": np.array(["2020-01-01", "2020-02-01"], "datetime64[ns]") if time is None
                                  else time, **(coords or {})})
    entries: dict = {}
    ds.to_zarr(zarr.storage.MemoryStore(store_dict=entries), zarr_format=2, consolidated=True, mode="w")
    return _zip(entries)


def _edited(data: bytes, edit) -> bytes:
    """``data`` with ``edit(entries, metadata)`` applied; each array's own .zarray/.zattrs rewritten to match."""
    entries = _entries(data)
    consolidated = json.loads(bytes(entries[".zmetadata"]))
    edit(entries, consolidated["metadata"])
    for key, value in consolidated["metadata"].items():
        entries[key] = json.dumps(value).encode()
    entries[".zmetadata"] = json.dumps(consolidated).encode()
    return _zip(entries)


def _drop_dims(entries, meta):
    for key in [k for k in meta if k.endswith("/.zattrs")]:
        meta[key].pop("_ARRAY_DIMENSIONS", None)


def _conflicting_dims(entries, meta):
    meta["file_id/.zattrs"]["_ARRAY_DIMENSIONS"] = ["band"]  # file_id has 2 values, band 2: fine; now make it 3
    meta["file_id/.zarray"].update(shape=[3], chunks=[3])
    entries["file_id/0"] = np.array(["a", "b", "c"], "<U34").tobytes()
    meta["file_id/.zarray"]["compressor"] = None


def _native_far_times(entries, meta):
    """``time`` stored as datetime64[s] (no CF units) with dates outside datetime64[ns]'s range."""
    meta["time/.zarray"].update(dtype="<M8[s]", compressor=None, fill_value=None)
    meta["time/.zattrs"] = {"_ARRAY_DIMENSIONS": ["time"]}
    entries["time/0"] = np.array(["2300-01-01", "1600-02-01"], "datetime64[s]").tobytes()


def _corrupt_x(entries, meta):
    entries["x/0"] = b"not a blosc frame"


STRANGE = {
    "big-endian integers": (lambda: _member(bands=np.arange(36, dtype=">i2").reshape(2, 2, 3, 3)), "same"),
    "big-endian floats": (lambda: _member(bands=np.arange(36, dtype=">f4").reshape(2, 2, 3, 3)), "same"),
    "times beyond the nanosecond range": (lambda: _edited(_member(extra={"file_id": (("time",), np.array(["a", "b"]))}),
                                                          _native_far_times), "same"),
    "character arrays": (lambda: _member(extra={"crs": (("nc",), np.array(list("32633"), "S1"))}), "left to xarray"),
    "no dimension names": (lambda: _edited(_member(), _drop_dims), "left to xarray"),
    "conflicting dimension sizes": (lambda: _edited(_member(), _conflicting_dims), "left to xarray"),
    "a damaged index coordinate": (lambda: _edited(_member(), _corrupt_x), "left to xarray"),
}


@pytest.mark.parametrize("case", sorted(STRANGE))
def test_stores_made_to_differ_read_as_xarray_reads_them_or_go_to_it(case):
    make, outcome = STRANGE[case]
    data = make()
    try:
        expected = _decode_xarray(open_member(data))
    except Exception as err:  # xarray refuses the store: so must the direct path, and decode_member says why
        expected = err
    if outcome == "same":
        assert not isinstance(expected, Exception)
        _same(_decode_direct(ArrayReader(_entries(data))), expected)
    else:
        with pytest.raises(Exception):
            _decode_direct(ArrayReader(_entries(data)))
    if isinstance(expected, Exception):
        with pytest.raises(type(expected)):
            decode_member(data)
    else:
        _same(decode_member(data), expected)
