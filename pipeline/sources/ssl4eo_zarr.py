"""SSL4EO-S12 v1.1 in its Zarr chunk-file layout.

Layout::

    {train,val}/{S1GRD,S2L1C,S2L2A}/ssl4eos12_{split}_seasonal_data_NNNNNN.zarr.zip

Each file is a zipped Zarr v2 store with consolidated metadata holding 64
locations: ``bands`` (sample, time=4, band, y=264, x=264), int16 for S2
(reflectance × 10000 **+ 1000**), float16 dB for S1. As released (the dataset
card's xarray listing, DLR-MF-DAS/SSL4EO-S12-v1.1 README.md), the coordinates are
``sample`` (location ids), ``time`` (0..3), ``band`` ('B01'..'B12', 'B8A'; 'vv',
'vh') and ``y``/``x`` (pixel indices), and the metadata are data variables:
``center_lat``, ``center_lon``, ``crs`` (sample,) int64 EPSG code, ``file_id``
and ``time_`` (sample, time), ``sample_id``, ``x_``/``y_`` (sample, x|y) metres;
S2 files add ``cloud_mask``. Either form of each (coordinate or variable, 'B1' or
'B01', 'EPSG:32632' or 32632) is read.

S1 and S2 files with the same number describe the same locations; they are paired
by location id. Within a location the four acquisitions are paired **by date**,
not by index: in this release the S1 cubes and ``file_id`` are stacked in
product-name order (S1A before S1B), which is not chronological, while ``time_``
is sorted (issue "Incorrect S1GRD ordering", DLR-MF-DAS/SSL4EO-S12-v1.1#4, fixed
in the WebDataset release). The product id names the acquisition stored at its
index, so the date comes from it (``time_`` only where a product id has none),
and `pair_by_date` matches the k-th S1 with the k-th S2 in date order. Each
sample's json records ``pair_gap_days``; a pair further apart than
``max_pair_gap_days`` is quarantined (temporal_mismatch). The time index is the
pair's date rank (0 = earliest), not a season.

Files are opened in place, never loaded whole: the zip's directory, then the chunk
of each location as it is needed, from the local file or by ranged reads of the
remote object; numcodecs decodes each chunk straight into the location's array
(`_Cubes`), and xarray reads any file that reader declines. On an object store the
chunks of the next ``read_ahead`` locations are fetched on threads, neighbours in the file in one ranged
request (`_ChunkReadAhead`).
"""

from __future__ import annotations

import re
import threading
import zipfile
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from pipeline.inventory import gathered
from pipeline.shards import Sample, make_key
from pipeline.sources.base import (
    MISSING_PARTNER,
    S2_NODATA,
    TEMPORAL_MISMATCH,
    UNREADABLE,
    WRONG_BAND_COUNT,
    Rejection,
    Result,
    Source,
    WorkItem,
    date_from_name,
    in_order,
    pair_by_date,
)
from pipeline.sources import ranges
from pipeline.sources.zarr_v2 import ArrayReader, Unsupported
from pipeline.sources.zip_entries import is_stored, stored_entry
from pipeline.storage import ReadAbandoned, RetryingFile, StorageUnavailable, is_local, read_range, retrying

# Product folders as published: S1 GRD, and one per S2 processing level ("S2" + level).
S1_PRODUCT = "S1GRD"
S2_PRODUCTS = {"L1C": "S2L1C", "L2A": "S2L2A"}
# File names as published, NNNNNN counting from 000001 in each split; _FILE matches them.
FILE_NAME = "ssl4eos12_{split}_seasonal_data_{number:06d}.zarr.zip"
_PRODUCT = "|".join((S1_PRODUCT, *S2_PRODUCTS.values()))
_FILE = re.compile(rf"(?:^|/)(?P<split>[^/]+)/(?P<product>{_PRODUCT})/ssl4eos12_(?P=split)_seasonal_data_(?P<num>\d+)\.zarr\.zip$")
S2_OFFSET = 1000


def open_zarr_zip(fs, path: str):
    """An xarray Dataset over a zipped Zarr v2 store, lazily indexed (no dask, no full read)."""
    import xarray as xr
    import zarr

    if is_local(fs):
        store = zarr.storage.ZipStore(path, mode="r")
    else:
        import fsspec
        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

        # every read of the zip (directory, metadata, chunks) retried through transient errors
        zfs = fsspec.filesystem("zip", fo=RetryingFile(fs, path, block_size=8 << 20))
        store = zarr.storage.FsspecStore(AsyncFileSystemWrapper(zfs, asynchronous=True), read_only=True, path="")
    return xr.open_zarr(store, consolidated=True, chunks=None)


def _iso(value: Any) -> Optional[str]:
    if value is None:
        return None
    v = np.datetime64(value, "s")
    return None if np.isnat(v) else f"{np.datetime_as_string(v)}Z"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _crs(value: Any) -> str:
    """CRS as 'EPSG:nnnnn' whether the file stores a string or the EPSG code as an integer."""
    text = _text(value)
    return f"EPSG:{text}" if text.isdigit() else text


def canonical_band(name: Any) -> str:
    """'B01' and 'b1' → 'B1'; 'B8A', 'VV' unchanged (upper case)."""
    text = _text(name).upper()
    return re.sub(r"^B0(\d)$", r"B\1", text)


def _per_time(arr, i: int, t: int) -> Any:
    """Value of a per-sample or per-(sample, time) coordinate."""
    v = arr[i]
    return v[t] if np.ndim(v) > 0 else v


def _file_metadata(fs, path: str) -> "dict[str, Any] | Exception":
    """What the inventory needs from one file (ids, sizes, per-sample metadata), or the error opening it."""
    try:
        ds = open_zarr_zip(fs, path)
        return {
            "ids": [_text(v) for v in ds["sample"].values],
            "ntime": int(ds["bands"].shape[1]),
            "shape": tuple(int(v) for v in ds["bands"].shape[2:]),
            "itemsize": ds["bands"].dtype.itemsize,
            **{key: ds[var].values if var in ds.variables else None for key, var in
               (("time", "time_"), ("file_id", "file_id"), ("lat", "center_lat"), ("lon", "center_lon"),
                ("crs", "crs"))},
        }
    except StorageUnavailable:
        raise
    except Exception as err:  # noqa: BLE001 - corrupt / truncated zip or metadata
        return err


def _product(c: dict[str, Any], i: int, t: int) -> Optional[str]:
    """The product id of acquisition ``t`` of location ``i``, None without ``file_id``."""
    return None if c["file_id"] is None else _text(_per_time(c["file_id"], i, t))


def _times(c: dict[str, Any], i: int) -> list[Optional[str]]:
    """ISO acquisition times of location ``i`` in stored order: from the product id that names the
    acquisition at each index, else from ``time_`` (which this release sorts independently for S1)."""
    out = []
    for t in range(c["ntime"]):
        product = _product(c, i, t)
        iso = date_from_name(product) if product else None
        if iso is None and c["time"] is not None:
            iso = _iso(_per_time(c["time"], i, t))
        out.append(iso)
    return out


class _Cubes:
    """The ``bands`` cube of one chunk file, one location (all its acquisitions) at a time.

    Read straight from the zip's chunk entries by `ArrayReader` (numcodecs decoding each chunk into its array),
    which checks ``bands`` and ``band`` as xarray would and declines a store whose values xarray would read
    otherwise (CF attributes, filters, a fill value to mask); a declined or damaged file is opened through xarray
    instead (`open_zarr_zip`), which reads it or says what is wrong, as it always did, and so is a location whose
    chunk the file leaves out (zarr writes no chunk that is all fill value: xarray reads the fill value there).
    The direct way is ~2x faster a location: zarr's event-loop round trips and an intermediate copy of each 7 MB
    chunk are gone (bench/results/2026-12-07-vm-preprocess-direct-zarr.md)."""

    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path
        self._raw: Any = None
        self._entries: Optional[_ZipEntries] = None
        self._zip: Optional[zipfile.ZipFile] = None
        self._reader: Optional[ArrayReader] = None
        self._ds = None
        try:
            self._open_direct()
        except StorageUnavailable:
            self.close()
            raise
        except Exception:  # noqa: BLE001 - Unsupported, or damaged: xarray reads it or raises its own error
            self.close()
            self._ds = open_zarr_zip(fs, path)

    def _open_direct(self) -> None:
        self._raw = open(self.path, "rb") if is_local(self.fs) else RetryingFile(self.fs, self.path, block_size=8 << 20)
        self._zip = zipfile.ZipFile(self._raw)  # does not close a file it was given: `close` does
        self._entries = _ZipEntries(self._zip)
        self._reader = ArrayReader(self._entries, arrays=("bands", "band"))
        if "bands" not in self._reader:
            raise KeyError("bands")

    def fetch_ahead(self, locations: Sequence[int], ahead: "_ChunkReadAhead") -> None:
        """Have ``ahead`` fetch the chunks of ``locations`` on its threads (neighbours in the file in one request);
        `location` takes them from there. Nothing for a file read through xarray, or for a chunk the reader will not
        find in the zip directory."""
        if self._reader is None or self._zip is None or self._entries is None:
            return
        infos = []
        for i in locations:
            try:
                keys = self._reader.row_keys("bands", i)
            except StorageUnavailable:
                raise
            except Exception:  # noqa: BLE001 - a location the file does not hold, damaged metadata: best effort
                continue  # only, `location` says what is wrong when it comes
            for key in keys:
                try:
                    info = self._zip.getinfo(key)
                except KeyError:  # a chunk the file leaves out: xarray reads its fill value when it comes
                    continue
                if _ChunkReadAhead.can_fetch(info) and key not in self._entries.ahead:
                    infos.append(info)
        if infos:
            self._entries.ahead.update(ahead.submit(self.path, infos))

    def drop_ahead(self, i: int) -> None:
        """Cancel and forget what was fetched ahead for location ``i`` (its partner's chunk failed: never read)."""
        if self._reader is None or self._entries is None:
            return
        try:
            keys = self._reader.row_keys("bands", i)
        except Exception:  # noqa: BLE001 - nothing was fetched for it then
            return
        for key in keys:
            fetched = self._entries.ahead.pop(key, None)
            if fetched is not None:
                fetched.cancel()

    def band_names(self) -> Optional[list[Any]]:
        """The stored band names, None without a ``band`` coordinate."""
        if self._reader is not None:
            return list(self._reader.read("band")) if "band" in self._reader else None
        return list(self._ds["band"].values) if "band" in self._ds.coords else None

    def location(self, i: int) -> np.ndarray:
        """(time, band, y, x) of location ``i``, writable, shared with nothing this reader keeps (the file's
        chunking puts one location in a chunk; with several, a view of the new array of their chunk row).
        Raises `LocationUnreadable` naming this file for anything but an outage."""
        try:
            if self._reader is not None:
                try:
                    return self._reader.read_row("bands", i)
                except Unsupported:  # a chunk left out: xarray reads the fill value, as it always did
                    pass
            if self._ds is None:
                self._ds = open_zarr_zip(self.fs, self.path)
            cube = np.asarray(self._ds["bands"][i].values)
            return cube if cube.flags.writeable else cube.copy()
        except StorageUnavailable:
            raise
        except Exception as err:  # noqa: BLE001 - a damaged chunk: the caller loses this location only
            raise LocationUnreadable(self.path, err) from err

    def close(self) -> None:
        for handle in (self._ds, self._zip, self._raw):
            if handle is not None:
                handle.close()
        self._ds = self._zip = self._raw = self._reader = self._entries = None


class LocationUnreadable(Exception):
    """A location's chunk that cannot be read, and the file that holds it."""

    def __init__(self, path: str, error: BaseException):
        super().__init__(f"{type(error).__name__}: {error}")
        self.path = path


class _ZipEntries(Mapping):
    """The members of a zip as ``{name: bytes}``, each read when asked for (the chunks of one location only)."""

    def __init__(self, zf: zipfile.ZipFile):
        self._zip = zf
        self._names = {n for n in zf.namelist() if not n.endswith("/")}
        self.ahead: dict[str, ranges.Fetched] = {}
        """Entries being fetched on `_ChunkReadAhead`'s threads, taken (and waited for) when asked for."""

    def __getitem__(self, name: str) -> Any:  # bytes, or a view of a read-ahead request's bytes
        if name not in self._names:
            raise KeyError(name)
        fetched = self.ahead.pop(name, None)
        if fetched is not None:
            return fetched.result()  # its error, if it had one: an outage (StorageUnavailable) or a damaged entry
        return self._zip.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class _ChunkReadAhead:
    """The chunks of the locations to come, fetched on threads while the current one is decoded, checked and
    written: on an object store each request waits a round trip before its first byte, and a location's S2 chunk is
    ~2.6 MB (7 MB decoded). Chunks that lie side by side in the zip (consecutive locations: zarr writes a file's
    chunks in order) are one ranged request of up to `RUN_BYTES` (`pipeline.sources.ranges`), so a batch of
    locations costs a request per ~8 MB, as the sequential read's blocks do, not one per chunk. Each entry is then
    checked against the directory's CRC-32 as zipfile checks it (`stored_entry`), on the fetching thread; a damaged
    entry fails its own location only. `close` cancels what has not started; a fetch still retrying through an
    outage gives up at its next attempt."""

    SLACK = 1024
    """Bytes fetched past the central directory's idea of an entry's end, for a longer local extra field."""
    RUN_BYTES = ranges.RUN_BYTES
    GAP_BYTES = ranges.GAP_BYTES
    """At most this much between two entries one request spans: a data descriptor, a longer local extra field, an
    entry of another array (metadata) between two chunks."""

    def __init__(self, fs, depth: int):
        self.fs = fs
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(2 * depth, thread_name_prefix="chunk-fetch")

    can_fetch = staticmethod(is_stored)
    """Stored, not encrypted (how zarr's ZipStore and the release write chunks, already compressed): what this
    class reads; zipfile reads anything else when it comes."""

    @classmethod
    def runs(cls, infos: Sequence[zipfile.ZipInfo]) -> list[list[zipfile.ZipInfo]]:
        """``infos`` (stored entries) grouped into the requests that fetch them (`ranges.runs`)."""
        return ranges.runs(infos, _extent, cls.GAP_BYTES, cls.RUN_BYTES)

    def submit(self, path: str, infos: Sequence[zipfile.ZipInfo]) -> dict[str, ranges.Fetched]:
        """Fetch stored entries ``infos`` of the zip at ``path`` (a request per `runs` group); {name: its Fetched}."""
        return ranges.submit(self.pool, lambda run: self._fetch_run(path, run), infos, _extent,
                             lambda info: info.filename, self.GAP_BYTES, self.RUN_BYTES)

    def _fetch_run(self, path: str, run: Sequence[zipfile.ZipInfo]) -> dict[str, Any]:
        """{name: the entry's bytes, or the exception reading it raised} for the entries of one request: each judged
        as zipfile judges it when it reads the entry itself (`stored_entry`: its checks and its words), so that a
        damaged entry is rejected alike with read-ahead and without. An outage fetching the request is raised."""
        start = run[0].header_offset
        asked = _extent(run[-1])[1] + self.SLACK
        data = memoryview(self._range(path, start, asked))

        def read(a: int, b: int) -> Any:
            if start <= a and b <= asked:  # in what was fetched (or past the end of the file: fewer bytes)
                return data[a - start:b - start]
            return self._range(path, a, b)  # a local extra field longer than SLACK: the rest of this entry

        out: dict[str, Any] = {}
        for info in run:
            try:
                out[info.filename] = stored_entry(info, read, self.SLACK)
            except Exception as err:  # noqa: BLE001 - raised when asked for: damage loses that location, an outage
                out[info.filename] = err  # (the rest of an entry past SLACK) stops the reader as it would have
        return out

    def _range(self, path: str, start: int, end: int) -> bytes:
        def cat_file(path: str, start: int, end: int) -> bytes:
            if self.stop.is_set():
                raise ReadAbandoned("the reader stopped")  # not transient: the retries end here
            return read_range(self.fs, path, start, end)

        return retrying(cat_file)(path, start, end)

    def close(self) -> None:
        self.stop.set()
        self.pool.shutdown(wait=False, cancel_futures=True)


def _extent(info: zipfile.ZipInfo) -> tuple[int, int]:
    """Where stored entry ``info`` lies in its zip by the central directory (local header, name, extra, data): its
    end is the next entry's offset in a zip written in one pass without data descriptors, as zarr's ZipStore writes."""
    name = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
    size = zipfile.sizeFileHeader + len(name) + len(info.extra) + info.compress_size
    return info.header_offset, info.header_offset + size


class _LocationCache:
    """All time steps of the current location: the files chunk one location (all seasons) per chunk,
    so reading (sample, time) one by one would decompress the same chunk once per season. The S2 offset, when
    removed, is removed here once for the whole location, in place."""

    def __init__(self, remove_offset: bool):
        self.remove_offset = remove_offset
        self.key: Optional[tuple[int, int]] = None
        self.arrays: tuple[np.ndarray, np.ndarray] = (np.empty(0), np.empty(0))

    def get(self, cubes1: _Cubes, cubes2: _Cubes, i1: int, i2: int) -> tuple[np.ndarray, np.ndarray]:
        """(time, bands, y, x) arrays of S1 location ``i1`` and S2 location ``i2``."""
        if self.key != (i1, i2):
            self.key = None
            s1, s2 = cubes1.location(i1), cubes2.location(i2)
            if self.remove_offset and np.issubdtype(s2.dtype, np.integer):
                # stored = raw - 1000 in the stored dtype, wrapping where raw - 1000 leaves it (no such value in the
                # release: raw no-data 0 becomes -1000): the offset taken modulo the dtype, as an int32 round trip
                # would give, for any integer dtype
                np.subtract(s2, np.array(S2_OFFSET).astype(s2.dtype), out=s2)
            self.arrays, self.key = (s1, s2), (i1, i2)
        return self.arrays


class SSL4EOZarr(Source):
    name = "ssl4eo-zarr"
    version = "SSL4EO-S12 v1.1 (Zarr)"
    split_names = ("train", "val")

    @property
    def s2_folder(self) -> str:
        return f"S2{self.options.s2_product}"

    def _files(self, listing: Optional[list[str]] = None) -> dict[str, dict[str, dict[str, str]]]:
        """{split: {number: {product folder: path}}} from one recursive listing."""
        out: dict[str, dict[str, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
        for path in retrying(self.fs.find)(self.root) if listing is None else listing:
            m = _FILE.search(path)
            if m:
                out[m["split"]][m["num"]][m["product"]] = path
        return out

    def available_splits(self) -> list[str]:
        listing = retrying(self.fs.find)(self.root)
        files = self._files(listing)
        if not files:
            raise FileNotFoundError(
                f"{self.input_url}: no SSL4EO-S12 v1.1 Zarr files "
                "({train,val}/{S1GRD,S2L1C,S2L2A}/ssl4eos12_<split>_seasonal_data_NNNNNN.zarr.zip)"
                + _other_release_hint(listing)
            )
        self._check_products({prod for nums in files.values() for prods in nums.values() for prod in prods})
        return [s for s in ("train", "val") if s in files] + sorted(set(files) - {"train", "val"})

    def _check_products(self, found: set[str]) -> None:
        """Stop before any work when a product folder the job needs is absent from every split."""
        listed = ", ".join(f"{p}/" for p in sorted(found))
        if self.s2_folder not in found:
            other = [level for level, folder in S2_PRODUCTS.items() if folder in found]
            hint = f": pass --s2-product {other[0]}" if other else ""
            raise FileNotFoundError(f"no {self.s2_folder}/ in {self.input_url}; found {listed}{hint}")
        if S1_PRODUCT not in found:
            raise FileNotFoundError(f"no {S1_PRODUCT}/ in {self.input_url}; found {listed}: "
                                    f"{self.name} pairs {S1_PRODUCT}/ with {self.s2_folder}/")

    def plan(self, split: str, map_fn: Callable) -> tuple[list[WorkItem], list[Rejection]]:
        pairs = self._files().get(split, {})
        if not pairs:
            raise FileNotFoundError(f"{self.input_url}: no Zarr files for split {split!r}")
        rejects: list[Rejection] = []
        jobs = []
        for num in sorted(pairs):
            s1, s2 = pairs[num].get(S1_PRODUCT), pairs[num].get(self.s2_folder)
            if s1 or s2:  # a file without its partner is inventoried too: each of its samples is a record
                jobs.append((num, s1, s2))
            else:  # only another product's file has this number: it holds nothing this job reads
                have = next(iter(pairs[num].values()))
                rejects.append(Rejection(self.url(have), None, MISSING_PARTNER,
                                         f"no {S1_PRODUCT} and no {self.s2_folder} file with number {num}"))
        # each pair's items stay where its inventory task ran (pipeline.inventory)
        return gathered(map_fn(self.inventory_pair, jobs), rejects)

    def inventory_pair(self, job: tuple[str, str, str]) -> tuple[list[WorkItem], list[Rejection]]:
        """Sample ids, times and metadata of one S1/S2 file pair, read from the Zarr metadata and coordinates."""
        num, p1, p2 = job
        if p1 is None or p2 is None:
            return [], self._unpaired(num, p1 or p2, S1_PRODUCT if p1 is None else self.s2_folder)
        coords = {tag: _file_metadata(self.fs, path) for tag, path in (("s1", p1), ("s2", p2))}
        if any(isinstance(c, Exception) for c in coords.values()):
            return [], self._unreadable(coords, {"s1": p1, "s2": p2})
        c1, c2 = coords["s1"], coords["s2"]
        index1 = {sid: i for i, sid in enumerate(c1["ids"])}
        index2 = {sid: i for i, sid in enumerate(c2["ids"])}
        (_, h, w) = c2["shape"]
        est = h * w * (len(self.s1_bands) * c1["itemsize"] + len(self.s2_bands) * c2["itemsize"]) + 2048
        items: list[WorkItem] = []
        rejects: list[Rejection] = []
        for sid in c2["ids"] + [s for s in c1["ids"] if s not in index2]:
            if sid not in index1 or sid not in index2:
                path = p2 if sid in index2 else p1
                missing = "S1" if sid in index2 else "S2"
                for t in range(max(c1["ntime"], c2["ntime"])):
                    rejects.append(Rejection(self.url(path), sid, MISSING_PARTNER, f"location has no {missing} data in file {num}",
                                             make_key(sid, f"t{t}"), t))
                continue
            its, rej = self._location(sid, (p1, index1[sid], c1), (p2, index2[sid], c2), est)
            items.extend(its)
            rejects.extend(rej)
        return items, rejects

    def _unpaired(self, num: str, path: str, missing: str) -> list[Rejection]:
        """One 'missing_partner' record per sample of a file whose partner file is absent (its metadata says which);
        quarantine counts samples, so a lost file of 64 locations x 4 seasons is 256 records, not one."""
        c = _file_metadata(self.fs, path)
        detail = f"no {missing} file with number {num}"
        if isinstance(c, Exception):  # neither file can tell which samples it held
            return [Rejection(self.url(path), None, UNREADABLE, f"{detail}, and {type(c).__name__}: {c}")]
        return [Rejection(self.url(path), sid, MISSING_PARTNER, detail, make_key(sid, f"t{t}"), t)
                for sid in c["ids"] for t in range(c["ntime"])]

    def _unreadable(self, coords: dict[str, Any], paths: dict[str, str]) -> list[Rejection]:
        """Rejections for a file pair whose metadata cannot be read: the partner tells which samples are lost."""
        rejects = []
        good = [t for t in ("s1", "s2") if not isinstance(coords[t], Exception)]
        for tag in ("s1", "s2"):
            err = coords[tag]
            if not isinstance(err, Exception):
                continue
            detail = f"{type(err).__name__}: {err}"
            if good:
                c = coords[good[0]]
                for sid in c["ids"]:
                    for t in range(c["ntime"]):
                        rejects.append(Rejection(self.url(paths[tag]), sid, UNREADABLE, detail, make_key(sid, f"t{t}"), t))
            else:
                rejects.append(Rejection(self.url(paths[tag]), None, UNREADABLE, detail))
        return rejects

    def _location(self, sid: str, s1: tuple, s2: tuple, est: int) -> tuple[list[WorkItem], list[Rejection]]:
        """The samples of one location: its S1 and S2 acquisitions paired by date (`pair_by_date`).

        ``s1`` / ``s2``: (file path, the location's index in the file, the file's metadata)."""
        (p1, i1, c1), (p2, i2, c2) = s1, s2
        times1, times2 = _times(c1, i1), _times(c2, i2)
        items: list[WorkItem] = []
        rejects: list[Rejection] = []
        limit = self.options.max_pair_gap_days
        for pair in pair_by_date(times1, times2):
            key = make_key(sid, f"t{pair.rank}")
            if pair.s1 is None or pair.s2 is None:
                missing, path = ("S1", p2) if pair.s1 is None else ("S2", p1)
                rejects.append(Rejection(self.url(path), sid, MISSING_PARTNER,
                                         f"no {missing} acquisition for acquisition {pair.rank} in date order",
                                         key, pair.rank))
                continue
            meta = {
                "lat": None if c2["lat"] is None else float(c2["lat"][i2]),
                "lon": None if c2["lon"] is None else float(c2["lon"][i2]),
                "crs": None if c2["crs"] is None else _crs(c2["crs"][i2]),
                "timestamps": {"s1": times1[pair.s1], "s2": times2[pair.s2]},
                "s1_product": _product(c1, i1, pair.s1),
                "s2_product": _product(c2, i2, pair.s2),
                "pair_gap_days": pair.gap_days,
            }
            if pair.gap_days is not None and pair.gap_days > limit:
                rejects.append(Rejection(self.url(p1), sid, TEMPORAL_MISMATCH,
                                         f"S1 {meta['s1_product']} ({times1[pair.s1]}) is {pair.gap_days:g} days from "
                                         f"S2 {meta['s2_product']} ({times2[pair.s2]}); limit {limit:g}", key, pair.rank))
                continue
            items.append(WorkItem(key, sid, pair.rank, {"s1": p1, "s2": p2, "i1": i1, "i2": i2, "t1": pair.s1,
                                                        "t2": pair.s2, "meta": meta}, est))
        return items, rejects

    def _band_order(self, cubes: _Cubes, expected: Sequence[str]) -> Optional[list[int]]:
        """Indices that put the file's bands in ``expected`` order, or None if the names do not match."""
        stored = cubes.band_names()
        names = None if stored is None else [canonical_band(v) for v in stored]
        if names is None or len(names) != len(expected):
            return None
        try:
            return [names.index(canonical_band(b)) for b in expected]
        except ValueError:
            return None

    def read(self, items: Sequence[WorkItem], split: str) -> Iterator[Result]:
        i = 0
        while i < len(items):
            j = i
            while j < len(items) and (items[j].refs["s1"], items[j].refs["s2"]) == (items[i].refs["s1"], items[i].refs["s2"]):
                j += 1
            yield from self._read_pair(items[i:j], split)
            i = j

    def _read_pair(self, items: Sequence[WorkItem], split: str) -> Iterator[Result]:
        p1, p2 = items[0].refs["s1"], items[0].refs["s2"]
        opened: list[_Cubes] = []
        try:
            for path in (p1, p2):
                opened.append(_Cubes(self.fs, path))
        except StorageUnavailable:  # an outage longer than the retry window: the job stops, nothing skipped
            raise
        except Exception as err:  # noqa: BLE001 - the file that would not open (S1 first) loses the pair's samples
            for it in items:
                yield Rejection(self.url(path), it.sample_id, UNREADABLE, f"{type(err).__name__}: {err}", it.key,
                                it.time_index)
            return
        finally:
            if len(opened) < 2:
                for cubes in opened:
                    cubes.close()
        try:
            yield from self._read_locations(items, split, *opened)
        finally:
            for cubes in opened:
                cubes.close()

    def _read_locations(self, items: Sequence[WorkItem], split: str, cubes1: _Cubes,
                        cubes2: _Cubes) -> Iterator[Result]:
        p1, p2 = items[0].refs["s1"], items[0].refs["s2"]
        location = _LocationCache(remove_offset=self.options.s2_offset == "remove")
        order1 = self._band_order(cubes1, self.s1_bands)
        order2 = self._band_order(cubes2, self.s2_bands)
        ahead = None
        if not is_local(self.fs) and self.options.read_ahead > 0 and order1 is not None and order2 is not None:
            ahead = _ChunkReadAhead(self.fs, self.options.read_ahead)
        try:
            yield from self._read_samples(items, split, cubes1, cubes2, location, (order1, order2), ahead)
        finally:
            if ahead is not None:
                ahead.close()

    def _read_samples(self, items: Sequence[WorkItem], split: str, cubes1: _Cubes, cubes2: _Cubes,
                      location: _LocationCache, orders: tuple, ahead: Optional[_ChunkReadAhead]) -> Iterator[Result]:
        p1, p2 = items[0].refs["s1"], items[0].refs["s2"]
        order1, order2 = orders
        # the locations in the order the items come, in batches of read_ahead: `ahead` fetches the first batch, and the
        # next one each time a batch's first location is in, so that up to 2 x read_ahead - 1 locations are in flight
        # while one is decoded and written, and a batch's chunks that lie side by side are one request
        depth = self.options.read_ahead if ahead is not None else 0
        locations = list(dict.fromkeys((it.refs["i1"], it.refs["i2"]) for it in items))
        batches = [locations[k:k + depth] for k in range(0, len(locations), depth)] if depth else []
        batch_starts = {batch[0]: b for b, batch in enumerate(batches)}

        def fetch_batch(b: int) -> None:
            if ahead is not None and b < len(batches):
                cubes1.fetch_ahead([i1 for i1, _ in batches[b]], ahead)
                cubes2.fetch_ahead([i2 for _, i2 in batches[b]], ahead)

        fetch_batch(0)
        current = None
        for it in items:
            begins = (it.refs["i1"], it.refs["i2"]) != current
            current = (it.refs["i1"], it.refs["i2"])
            if order1 is None or order2 is None:
                which, cubes = ("S1", cubes1) if order1 is None else ("S2", cubes2)
                stored = cubes.band_names()
                names = [_text(v) for v in stored] if stored is not None else "no band coordinate"
                yield Rejection(self.url(p1 if order1 is None else p2), it.sample_id, WRONG_BAND_COUNT,
                                f"{which} bands {names}, expected {list(self.s1_bands if order1 is None else self.s2_bands)}",
                                it.key, it.time_index)
                continue
            try:
                try:
                    s1, s2 = location.get(cubes1, cubes2, it.refs["i1"], it.refs["i2"])
                finally:
                    if begins and current in batch_starts:  # a batch's first location is in (or lost): the next
                        fetch_batch(batch_starts.pop(current) + 1)  # batch goes into flight
                # views where the stored order is ours: the samples share the location's arrays, never changed
                s1, s2 = in_order(s1[it.refs["t1"]], order1), in_order(s2[it.refs["t2"]], order2)
            except LocationUnreadable as err:  # a corrupt chunk loses this location's samples only
                cubes1.drop_ahead(it.refs["i1"])  # the other chunk of a pair whose first failed is never read
                cubes2.drop_ahead(it.refs["i2"])
                yield Rejection(self.url(err.path), it.sample_id, UNREADABLE, str(err), it.key, it.time_index)
                continue
            except StorageUnavailable:
                raise
            except Exception as err:  # noqa: BLE001 - a cube of another shape than planned loses this sample only
                yield Rejection(self.url(p2), it.sample_id, UNREADABLE, f"{type(err).__name__}: {err}", it.key, it.time_index)
                continue
            bad = self.check(it, s1, s2, self.url(p2))
            if bad is not None:
                yield bad
                continue
            meta: dict[str, Any] = {
                "sample_id": it.sample_id,
                "time_index": it.time_index,
                "source": self.name,
                "split": split,
                **it.refs["meta"],
                "s1_bands": list(self.s1_bands),
                "s2_bands": list(self.s2_bands),
            }
            yield Sample(it.key, s1, s2, meta)

    def nodata(self) -> dict[str, Any]:
        # Raw no-data is 0; with the offset removed it is stored as -1000.
        return {"s1": "non-finite", "s2": S2_NODATA - S2_OFFSET if self.options.s2_offset == "remove" else S2_NODATA}

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(
            s2_product=self.options.s2_product,
            s2_offset={
                "source_offset": S2_OFFSET,
                "handling": self.options.s2_offset,
                "note": ("stored = raw - 1000 for every pixel (int16, exactly invertible; raw no-data 0 becomes -1000)"
                         if self.options.s2_offset == "remove" else "stored = raw (reflectance x 10000 + 1000)"),
            },
            pairing=("S1GRD and S2 files with the same number, paired by location id; a location's S1 and S2 "
                     "acquisitions paired by acquisition date (from the product ids in file_id, time_ where a "
                     "product id has none): the k-th S1 with the k-th S2 in date order, the pairing with the least "
                     "total gap, never by index (the release stores S1 in product-name order); time_index is that "
                     "date rank; pair_gap_days in each sample's json"),
            max_pair_gap_days=self.options.max_pair_gap_days,
        )
        return d


def _other_release_hint(listing: list[str]) -> str:
    """Name the source that reads what was found instead, when it is one of the WebDataset releases."""
    names = [p.rsplit("/", 1)[-1] for p in listing]
    # Shard names of the WebDataset releases: {ssl4eos12,majortom}_shard_NNNNNN.tar (see sources/ssl4eo_wds.py
    # and sources/terramesh.py for where each fact comes from).
    if any(n.startswith("majortom_shard_") and n.endswith(".tar") for n in names):
        return "; found TerraMesh WebDataset shards (majortom_shard_*.tar): use --source terramesh"
    if any(n.startswith("ssl4eos12_shard_") and n.endswith(".tar") for n in names):
        return ("; found WebDataset shards (ssl4eos12_shard_*.tar), the current SSL4EO-S12 v1.1 release: "
                "use --source ssl4eo-wds (or --source terramesh for TerraMesh)")
    return ""
