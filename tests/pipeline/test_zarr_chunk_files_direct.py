"""The chunk-file release (`ssl4eo-zarr`) read straight from its zip entries, one location at a time
(`ArrayReader.read_row`, numcodecs decoding each chunk into its array), gives exactly what xarray gives; a store
the direct reader declines goes to xarray, and a damaged chunk loses its own location only."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numcodecs
import numpy as np
import pytest
from conftest import fresh_s3fs

from pipeline import synthetic
from pipeline.shards import Sample
from pipeline.sources import SOURCES, SourceOptions
from pipeline.sources import ssl4eo_zarr
from pipeline.sources.zarr_v2 import ArrayReader, Unsupported
from pipeline.storage import url_to_fs


def _read(root: Path, **options) -> tuple[list, list]:
    """Plan and read the train split in this process: ([(key, s1 dtype, s1 bytes, s2 dtype, s2 bytes, meta)],
    [(key, reason, detail)])."""
    reader = SOURCES["ssl4eo-zarr"](str(root), SourceOptions(**options))
    items, rejects = reader.plan("train", lambda fn, args: [fn(a) for a in args])
    rejected = [(r.key, r.reason, r.detail) for r in rejects]
    # the samples are kept, as the shard writer keeps them queued, and their bytes read once the reader is done:
    # an array changed after it was yielded (they are views of their location's array) shows here
    kept = []
    for r in reader.read(list(items), "train"):
        if isinstance(r, Sample):
            kept.append(r)
        else:
            rejected.append((r.key, r.reason, r.detail))
    samples = [(r.key, r.s1.dtype.str, r.s1.tobytes(), r.s2.dtype.str, r.s2.tobytes(), r.meta) for r in kept]
    return samples, rejected


def _through_xarray(monkeypatch) -> None:
    def declined(self, fs, path):
        raise Unsupported("declined by the test")

    monkeypatch.setattr(ssl4eo_zarr._Cubes, "_open_direct", declined)


def _rewrite(path: Path, edit) -> None:
    """Rewrite the zip at ``path`` with ``edit(entries)`` applied to its ``{name: bytes}``."""
    with zipfile.ZipFile(path) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    edit(entries)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chunk-files")
    synthetic.make_ssl4eo_zarr(root, splits={"train": 2}, samples_per_file=3, size=18, seed=11)
    return root


def _files(root: Path, product: str) -> list[Path]:
    return sorted((root / "train" / product).glob("*.zarr.zip"))


def test_the_release_files_are_read_directly(archive):
    fs, _ = url_to_fs(str(archive))
    for product in ("S1GRD", "S2L1C", "S2L2A"):
        cubes = ssl4eo_zarr._Cubes(fs, str(_files(archive, product)[0]))
        try:
            assert cubes._reader is not None, product  # not the xarray fallback
            assert cubes.location(2).shape[0] == 4 and cubes.location(2).flags.writeable
        finally:
            cubes.close()


@pytest.mark.parametrize("options", [{}, {"s2_offset": "keep"}, {"s2_product": "L2A"}], ids=["L1C", "keep", "L2A"])
def test_direct_and_xarray_give_the_same_samples(archive, monkeypatch, options):
    direct = _read(archive, **options)
    assert len(direct[0]) == 2 * 3 * 4 and direct[1] == []
    with monkeypatch.context() as m:
        _through_xarray(m)
        assert _read(archive, **options) == direct
    if not options:  # the offset is removed: stored = raw - 1000, raw as xarray reads it
        raw = _read(archive, s2_offset="keep")[0]
        for (_, _, _, dtype, removed, _), (_, _, _, _, kept, _) in zip(direct[0], raw):
            np.testing.assert_array_equal(np.frombuffer(removed, dtype),
                                          np.frombuffer(kept, dtype).astype(np.int32) - 1000)


def test_a_store_the_direct_reader_declines_is_read_through_xarray(archive, tmp_path, monkeypatch):
    root = tmp_path / "declined"
    synthetic.make_ssl4eo_zarr(root, splits={"train": 1}, samples_per_file=2, size=18, seed=12)
    s2 = _files(root, "S2L1C")[0]

    def with_an_attribute_xarray_decodes(entries):
        meta = json.loads(entries[".zmetadata"])
        meta["metadata"]["bands/.zattrs"]["add_offset"] = 0  # xarray's CF decoding turns the values to float
        entries[".zmetadata"] = json.dumps(meta).encode()

    _rewrite(s2, with_an_attribute_xarray_decodes)
    fs, _ = url_to_fs(str(root))
    cubes = ssl4eo_zarr._Cubes(fs, str(s2))
    assert cubes._reader is None and cubes.location(0).dtype.kind == "f"
    cubes.close()
    got = _read(root)
    with monkeypatch.context() as m:
        _through_xarray(m)
        assert _read(root) == got
    assert len(got[0]) == 2 * 4 and {s[3] for s in got[0]} != {"<i2"}  # xarray's values, not the stored ints


def test_a_damaged_chunk_loses_its_location_only(archive, tmp_path, monkeypatch):
    root = tmp_path / "damaged"
    synthetic.make_ssl4eo_zarr(root, splits={"train": 1}, samples_per_file=3, size=18, seed=13)
    intact = _read(root)
    location_ids = sorted({s[5]["sample_id"] for s in intact[0]})

    def garbage_chunk(entries):
        entries["bands/1.0.0.0.0"] = b"not a blosc frame" * 8

    s2 = _files(root, "S2L1C")[0]
    _rewrite(s2, garbage_chunk)
    fs, _ = url_to_fs(str(root))
    lost = ssl4eo_zarr._file_metadata(fs, str(s2))["ids"][1]  # the location chunk 1 holds
    assert lost in location_ids
    for path in ("direct", "xarray"):
        with monkeypatch.context() as m:
            if path == "xarray":
                _through_xarray(m)
            samples, rejected = _read(root)
        assert samples == [s for s in intact[0] if s[5]["sample_id"] != lost], path
        assert sorted(k for k, _, _ in rejected) == [f"{lost}_t{t}" for t in range(4)], path
        assert {reason for _, reason, _ in rejected} == {"unreadable"}, path
        if path == "direct":  # the message names the file's chunk, the rejection the file that holds it
            assert all("bands/1.0.0.0.0" in detail for _, _, detail in rejected)


@pytest.mark.parametrize("product", ["S1GRD", "S2L1C"])
def test_a_chunk_the_file_leaves_out_reads_as_xarray_reads_it(tmp_path, monkeypatch, product):
    """zarr writes no chunk that is all fill value; xarray reads the fill value there (NaN for S1, 0 for S2: an
    all-no-data location), and so must the direct path, which hands such a location to xarray."""
    root = tmp_path / "sparse"
    synthetic.make_ssl4eo_zarr(root, splits={"train": 1}, samples_per_file=3, size=18, seed=14)

    def without_chunk_1(entries):
        del entries["bands/1.0.0.0.0"]

    _rewrite(_files(root, product)[0], without_chunk_1)
    direct = _read(root)
    with monkeypatch.context() as m:
        _through_xarray(m)
        assert _read(root) == direct
    fs, _ = url_to_fs(str(root))
    lost = ssl4eo_zarr._file_metadata(fs, str(_files(root, product)[0]))["ids"][1]
    assert len(direct[0]) == 2 * 4 and sorted(k for k, _, _ in direct[1]) == [f"{lost}_t{t}" for t in range(4)]
    assert {reason for _, reason, _ in direct[1]} == {"non_finite" if product == "S1GRD" else "all_nodata"}


# -- ArrayReader.read_row on its own --------------------------------------------------------------------------------


def _store(bands: np.ndarray, chunks: tuple, compressor: str = "blosc") -> dict[str, bytes]:
    """A consolidated Zarr v2 store written by xarray's own zarr writer: ``bands`` (sample, time, y, x)."""
    import xarray as xr
    import zarr

    ds = xr.Dataset({"bands": (("sample", "time", "y", "x"), bands)})
    encoding = {"chunks": chunks, **({"compressors": None} if compressor == "none" else {})}
    entries: dict = {}
    ds.to_zarr(zarr.storage.MemoryStore(store_dict=entries), zarr_format=2, consolidated=True, mode="w",
               encoding={"bands": encoding})
    return {k: v.to_bytes() for k, v in entries.items()}


@pytest.mark.parametrize("dtype, chunks, compressor", [
    ("<i2", (1, 2, 5, 5), "blosc"),  # a chunk per row: decoded straight into the row
    ("<i2", (3, 1, 2, 5), "blosc"),  # rows, times and y chunked, cut at the edges
    ("<f2", (2, 2, 5, 5), "none"),
    (">f4", (3, 2, 5, 5), "blosc"),  # big-endian: values in native order, as xarray gives them
])
def test_read_row_is_the_row_of_the_whole_array(dtype, chunks, compressor):
    bands = np.arange(7 * 2 * 5 * 5).astype(dtype).reshape(7, 2, 5, 5)
    reader = ArrayReader(_store(bands, chunks, compressor))
    whole = reader.read("bands")
    np.testing.assert_array_equal(whole, bands)
    for i in range(-7, 7):
        row = reader.read_row("bands", i)
        assert row.dtype == whole.dtype and row.dtype.isnative and row.flags.writeable
        np.testing.assert_array_equal(row, bands[i])
    for i in (7, -8):
        with pytest.raises(IndexError, match="row"):
            reader.read_row("bands", i)


def test_only_the_arrays_asked_for_are_checked():
    bands = np.arange(2 * 2 * 5 * 5, dtype=np.int16).reshape(2, 2, 5, 5)
    entries = _store(bands, (1, 2, 5, 5))
    meta = json.loads(entries[".zmetadata"])
    meta["metadata"]["other/.zarray"] = {**meta["metadata"]["bands/.zarray"], "filters": [{"id": "delta", "dtype": "<i2"}]}
    meta["metadata"]["other/.zattrs"] = {"_ARRAY_DIMENSIONS": ["sample", "time", "y", "x"]}
    entries[".zmetadata"] = json.dumps(meta).encode()
    with pytest.raises(Unsupported, match="filters"):
        ArrayReader(entries)
    reader = ArrayReader(entries, arrays=("bands",))
    assert "bands" in reader and "other" not in reader
    np.testing.assert_array_equal(reader.read_row("bands", 1), bands[1])


@pytest.mark.parametrize("how", ["read_row", "read"])
def test_a_blosc_chunk_of_another_size_is_refused_not_decoded_into_the_row(how):
    bands = np.arange(2 * 2 * 5 * 5, dtype=np.int16).reshape(2, 2, 5, 5)
    entries = _store(bands, (1, 2, 5, 5))
    zarray = json.loads(entries[".zmetadata"])["metadata"]["bands/.zarray"]
    codec = numcodecs.get_codec(zarray["compressor"])
    entries["bands/1.0.0.0"] = codec.encode(np.arange(10, dtype=np.int16))  # a valid frame, 10 values not 50
    reader = ArrayReader(entries)
    with pytest.raises(ValueError, match=r"bands/1\.0\.0\.0: 10 values, expected 50"):
        reader.read_row("bands", 1) if how == "read_row" else reader.read("bands")
    np.testing.assert_array_equal(reader.read_row("bands", 0), bands[0])


def test_a_file_on_s3_is_read_directly_through_its_ranged_reads(archive, s3_bucket):
    s3 = fresh_s3fs()
    local = _files(archive, "S2L1C")[1]
    remote = f"{s3_bucket}/train/S2L1C/{local.name}"
    s3.put(str(local), remote)
    fs, _ = url_to_fs(str(archive))
    cubes, expected = ssl4eo_zarr._Cubes(s3, remote), ssl4eo_zarr._Cubes(fs, str(local))
    try:
        assert cubes._reader is not None  # the zip directory and chunks read over the retrying ranged file
        assert cubes.band_names() == expected.band_names()
        for i in range(3):
            np.testing.assert_array_equal(cubes.location(i), expected.location(i))
    finally:
        cubes.close()
        expected.close()


# -- reading ahead on an object store ---------------------------------------------------------------------------------


def _flip_a_byte_of(path: Path, key: str) -> None:
    """Change one byte inside entry ``key``'s data, leaving the zip's directory (and its CRC-32) as it was."""
    import struct

    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(key)
    data = bytearray(path.read_bytes())
    header = struct.unpack(zipfile.structFileHeader, data[info.header_offset:info.header_offset + zipfile.sizeFileHeader])
    at = info.header_offset + zipfile.sizeFileHeader + header[10] + header[11] + info.compress_size // 2
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def on_s3(tmp_path, s3_bucket) -> tuple[Path, str]:
    """An archive with one damaged chunk, the middle one of its file (a flipped byte: the zip's CRC-32 no longer
    matches), locally and on S3."""
    root = tmp_path / "archive"
    synthetic.make_ssl4eo_zarr(root, splits={"train": 2}, samples_per_file=3, size=18, seed=15)
    _flip_a_byte_of(_files(root, "S2L1C")[1], "bands/1.0.0.0.0")
    fresh_s3fs().put(str(root), f"{s3_bucket}/archive", recursive=True)
    return root, f"{s3_bucket}/archive"


def test_reading_ahead_on_s3_gives_the_local_samples_and_rejections(on_s3, monkeypatch):
    """Read ahead, a batch's chunks that lie side by side in their file are one ranged request; a damaged chunk in
    the middle of a request loses its own location only, with the words zipfile has for it."""
    root, url = on_s3
    local = _read(root)
    lost = [k for k, reason, _ in local[1]]
    assert len(local[0]) == 2 * 3 * 4 - 4 and len(lost) == 4 and {r for _, r, _ in local[1]} == {"unreadable"}
    assert all("Bad CRC-32 for file 'bands/1.0.0.0.0'" in detail for _, _, detail in local[1])
    runs, requests, read_by_zipfile = [], [], []
    fetch_run, fetch, zip_read = (ssl4eo_zarr._ChunkReadAhead._fetch_run, ssl4eo_zarr._ChunkReadAhead._range,
                                  zipfile.ZipFile.read)
    monkeypatch.setattr(ssl4eo_zarr._ChunkReadAhead, "_fetch_run", lambda self, path, run: runs.append(
        [i.filename for i in run]) or fetch_run(self, path, run))
    monkeypatch.setattr(ssl4eo_zarr._ChunkReadAhead, "_range", lambda self, path, start, end: requests.append(
        (path, start, end)) or fetch(self, path, start, end))
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda self, name, *a: (
        read_by_zipfile.append(name) if name.startswith("bands/") else None) or zip_read(self, name, *a))
    chunks = [f"bands/{i}.0.0.0.0" for i in range(3)]
    for depth, expected_runs in ((4, [chunks] * 4), (2, [chunks[:2], chunks[2:]] * 4), (1, [[c] for c in chunks] * 4),
                                 (0, [])):
        runs.clear()
        requests.clear()
        read_by_zipfile.clear()
        assert _read(url, read_ahead=depth) == local, depth  # the damaged chunk fails its CRC check there too
        # every location's S1 and S2 chunk fetched ahead, a batch of `depth` locations' neighbours in one request
        # (each file's 3 locations); none without read-ahead
        assert sorted(runs) == sorted(expected_runs), depth
        assert len(requests) == len(expected_runs), depth
        # and those fetched are the ones used: zipfile reads only what the damaged location's later items read
        # again, or, without read-ahead, every chunk
        assert set(read_by_zipfile) == ({"bands/1.0.0.0.0"} if depth else set(chunks))


def test_requests_span_neighbouring_entries_up_to_their_limits(tmp_path, monkeypatch):
    """`_ChunkReadAhead.runs`: entries in file order, one request while each begins within GAP_BYTES of the last
    one's end and the request spans at most RUN_BYTES; an entry larger than that is a request of its own."""
    path = tmp_path / "a.zip"
    sizes = {"a": 100, "b": 100, "meta": 40, "c": 100, "d": 500, "e": 100}
    with zipfile.ZipFile(path, "w") as zf:
        for name, size in sizes.items():
            zf.writestr(name, bytes(size))
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename: i for i in zf.infolist()}
    entry = 30 + 1 + 100  # local header, a one-letter name, no extra field, 100 bytes
    assert ssl4eo_zarr._extent(infos["a"]) == (0, entry) and infos["b"].header_offset == entry
    picked = [infos[n] for n in ("e", "c", "b", "a", "d")]  # not in file order; "meta" not asked for
    runs = lambda: [[i.filename for i in run] for run in ssl4eo_zarr._ChunkReadAhead.runs(picked)]  # noqa: E731
    monkeypatch.setattr(ssl4eo_zarr._ChunkReadAhead, "GAP_BYTES", 0)
    monkeypatch.setattr(ssl4eo_zarr._ChunkReadAhead, "RUN_BYTES", 1 << 20)
    assert runs() == [["a", "b"], ["c", "d", "e"]]  # "meta" lies between b and c
    monkeypatch.setattr(ssl4eo_zarr._ChunkReadAhead, "GAP_BYTES", 34 + 40)  # its header, name and data: skipped
    assert runs() == [["a", "b", "c", "d", "e"]]
    monkeypatch.setattr(ssl4eo_zarr._ChunkReadAhead, "GAP_BYTES", 34 + 40 - 1)
    assert runs() == [["a", "b"], ["c", "d", "e"]]
    monkeypatch.setattr(ssl4eo_zarr._ChunkReadAhead, "RUN_BYTES", 2 * entry)
    assert runs() == [["a", "b"], ["c"], ["d"], ["e"]]  # d alone is larger than RUN_BYTES


def test_a_request_read_ahead_judges_each_entry_apart(tmp_path):
    """Each entry of one request is checked as zipfile checks it, its damage its own: intact entries, one with a
    flipped byte, and two whose local header has an extra field the directory lacks (longer than SLACK): in the
    middle of the request the next entry's bytes hold the rest, for the last one the rest is a second request."""
    import fsspec

    path = tmp_path / "a.zip"
    payload = bytes(range(256)) * 4
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a", payload)
        for name in ("b", "c", "d"):
            if name == "c":
                zf.writestr(name, payload)
                continue
            with zf.open(zipfile.ZipInfo(name), "w", force_zip64=True) as f:  # a local zip64 extra field only
                f.write(payload[::-1])
    _flip_a_byte_of(path, "c")
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        assert [len(i.extra) for i in infos] == [0, 0, 0, 0] and zf.read("b") == zf.read("d") == payload[::-1]
    requests = []
    ahead = ssl4eo_zarr._ChunkReadAhead(fsspec.filesystem("file"), 1)
    fetch = ahead._range
    ahead._range = lambda *a: requests.append(a) or fetch(*a)
    ahead.SLACK = 0  # so that a local extra field is more than the request holds for its entry
    try:
        got = ahead.submit(str(path), infos)
        assert bytes(got["a"].result()) == payload
        assert bytes(got["b"].result()) == bytes(got["d"].result()) == payload[::-1]
        with pytest.raises(zipfile.BadZipFile, match="Bad CRC-32 for file 'c'"):
            got["c"].result()
        assert len(requests) == 2  # the four entries, then the rest of "d"
    finally:
        ahead.close()


def test_a_chunk_holding_several_locations_is_fetched_once(tmp_path):
    """Where a chunk holds two locations, a batch asks for it twice: one request, the chunk in it once, and every
    location reads its row of it."""
    import fsspec

    bands = np.arange(4 * 2 * 5 * 5, dtype=np.int16).reshape(4, 2, 5, 5)
    path = tmp_path / "two-locations-a-chunk.zarr.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in _store(bands, (2, 2, 5, 5)).items():
            zf.writestr(name, data)
    fs = fsspec.filesystem("file")
    cubes, ahead = ssl4eo_zarr._Cubes(fs, str(path)), ssl4eo_zarr._ChunkReadAhead(fs, 4)
    requests = []
    fetch = ahead._range
    ahead._range = lambda *a: requests.append(a) or fetch(*a)
    try:
        assert cubes._reader is not None
        cubes.fetch_ahead([0, 1, 2, 3], ahead)
        assert sorted(cubes._entries.ahead) == ["bands/0.0.0.0", "bands/1.0.0.0"]
        for i in range(4):
            np.testing.assert_array_equal(cubes.location(i), bands[i])
        assert len(requests) == 1  # both chunks, side by side, each once
    finally:
        ahead.close()
        cubes.close()


def _through_the_proxy(tmp_path, s3_bucket, store_proxy, monkeypatch, window_s: float, seed: int):
    """(reader, items) of a 6-location archive on S3 read through the fault proxy: read-ahead 2, no retries below
    ours (botocore's, s3fs's), the retry window ``window_s``."""
    import s3fs

    from pipeline.storage import RETRY_WINDOW_ENV

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    monkeypatch.setenv(RETRY_WINDOW_ENV, repr(float(window_s)))
    root = tmp_path / "archive"
    synthetic.make_ssl4eo_zarr(root, splits={"train": 1}, samples_per_file=6, size=18, seed=seed)
    fresh_s3fs().put(str(root), f"{s3_bucket}/archive", recursive=True)
    reader = SOURCES["ssl4eo-zarr"](f"{s3_bucket}/archive", SourceOptions(
        read_ahead=2, storage_options={"skip_instance_cache": True, "endpoint_url": store_proxy.url,
                                       "config_kwargs": {"retries": {"max_attempts": 1}}}))
    items, _ = reader.plan("train", lambda fn, args: [fn(a) for a in args])
    return reader, items


def _fetch_threads_end(within_s: float) -> bool:
    import threading
    import time

    deadline = time.monotonic() + within_s
    while any(t.name.startswith("chunk-fetch") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not any(t.name.startswith("chunk-fetch") for t in threading.enumerate())


def test_a_reader_stopped_during_an_outage_leaves_no_fetch_behind(tmp_path, s3_bucket, store_proxy, monkeypatch):
    """Chunks fetched ahead and retrying through an outage give up once their reader is closed (a shard task that
    failed downstream), well within the retry window, instead of holding the process until the window ends."""
    reader, items = _through_the_proxy(tmp_path, s3_bucket, store_proxy, monkeypatch, window_s=900, seed=16)
    store_proxy.latency(1.0)  # every request takes a second: the next location's fetch is still in flight
    results = reader.read(list(items), "train")
    assert isinstance(next(results), Sample)  # the first location is in, the third one's chunks are on their way
    store_proxy.outage(600)  # their connections cut, new ones refused: they retry (for up to 900 s)
    results.close()
    assert _fetch_threads_end(within_s=60)


def test_an_outage_past_the_window_during_read_ahead_stops_the_reader(tmp_path, s3_bucket, store_proxy, monkeypatch):
    """A chunk fetched ahead through an outage longer than the retry window stops the reader with
    `StorageUnavailable` (the job stops, exit 3), never a quarantine; and its threads end."""
    from pipeline.storage import StorageUnavailable

    reader, items = _through_the_proxy(tmp_path, s3_bucket, store_proxy, monkeypatch, window_s=3, seed=17)
    store_proxy.latency(0.5)
    results = reader.read(list(items), "train")
    got = [next(results)]
    store_proxy.outage(600)
    with pytest.raises(StorageUnavailable, match="storage unreachable"):
        got.extend(results)
    assert [r.to_dict() for r in got if not isinstance(r, Sample)] == []  # nothing quarantined on the way
    assert _fetch_threads_end(within_s=30)
