"""The shard format: the contract between preprocessing, training and evaluation.

A shard is an uncompressed POSIX tar readable by the plain ``webdataset``
library. Each sample is three members sharing a key:

- ``<key>.s1.npy``: Sentinel-1, shape (2, H, W), bands (VV, VH), backscatter in
  dB, in the source dtype (float16 for SSL4EO-S12 v1.1 Zarr, float32 for GeoTIFF).
- ``<key>.s2.npy``: Sentinel-2, shape (C, H, W), C = 13 (L1C) or 12 (L2A), top-of-
  atmosphere / surface reflectance × 10000 in the source dtype (int16 or uint16),
  every band on the 10 m grid (coarser bands repeated nearest-neighbour).
- ``<key>.json``: metadata (sample_id, time_index, source, split, lat, lon, crs,
  timestamps, band names, labels, ...).

Tar headers carry no wall-clock time, user or group, so the same samples give
byte-identical shards on every run.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import math
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Container, Iterator, Optional

import numpy as np

SHARD_NAME = "{split}-{index:06d}.tar"
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")
MEMBERS = ("json", "s1.npy", "s2.npy")
"""The members of every sample, in the order they are written."""


class ShardFormatError(ValueError):
    """Bytes that do not follow the shard format (a truncated member, a bad .npy payload)."""


def make_key(*parts: Any) -> str:
    """A webdataset key from id parts: '.' splits key from extension in webdataset, so it is replaced."""
    key = "_".join(str(p) for p in parts if p is not None and p != "")
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", key)
    if not key:
        raise ValueError("empty sample key")
    return key


def encode_npy(array: np.ndarray) -> bytes:
    """NumPy .npy bytes of ``array`` (C order, dtype kept, no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """The array of .npy bytes (a read-only view on them: see `npy_view`)."""
    return npy_view(data)


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}


def npy_view(data: bytes) -> np.ndarray:
    """The array of .npy bytes as a read-only view (``np.frombuffer``, no copy); headers parsed once per kind.

    Raises ShardFormatError for anything that is not a plain (non-object) .npy payload of the full length."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ShardFormatError("not an .npy payload (bad magic)")
    if data[6] == 1:
        start, hlen = 10, int.from_bytes(data[8:10], "little")
    elif data[6] in (2, 3):
        start, hlen = 12, int.from_bytes(data[8:12], "little")
    else:
        raise ShardFormatError(f"unsupported .npy version {data[6]}")
    header = bytes(data[start:start + hlen])
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        try:
            d = ast.literal_eval(header.decode("latin1"))
            dtype = np.lib.format.descr_to_dtype(d["descr"])
            parsed = (dtype, tuple(int(s) for s in d["shape"]), bool(d["fortran_order"]))
        except Exception as err:  # noqa: BLE001 - any malformed header is a format error
            raise ShardFormatError(f"bad .npy header {header[:80]!r}: {type(err).__name__}: {err}") from None
        if dtype.hasobject:
            raise ShardFormatError("object arrays are not allowed")
        if len(_NPY_HEADERS) < 64:
            _NPY_HEADERS[header] = parsed
    dtype, shape, fortran = parsed
    count = math.prod(shape)
    offset = start + hlen
    if len(data) - offset < count * dtype.itemsize:
        raise ShardFormatError(f".npy payload truncated: {len(data) - offset} bytes for shape {shape} {dtype}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return arr.reshape(shape, order="F" if fortran else "C")


def encode_json(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


@dataclass
class Sample:
    key: str
    s1: np.ndarray
    """(2, H, W) VV, VH in dB."""
    s2: np.ndarray
    """(C, H, W) reflectance × 10000 on the 10 m grid."""
    meta: dict[str, Any] = field(default_factory=dict)

    def members(self) -> list[tuple[str, bytes]]:
        return [
            (f"{self.key}.json", encode_json(self.meta)),
            (f"{self.key}.s1.npy", encode_npy(self.s1)),
            (f"{self.key}.s2.npy", encode_npy(self.s2)),
        ]


class _HashingWriter(io.RawIOBase):
    """A file wrapper that hashes and counts what passes through it."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.sha = hashlib.sha256()
        self.bytes = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        self.sha.update(b)
        self.bytes += len(b)
        return self.f.write(b)


_COPY_BYTES = 1 << 20


class ShardWriter:
    """Write samples into one deterministic tar file, hashing on the fly.

    The tar is written by ``webdataset.TarWriter`` with every header field that could vary
    fixed (mtime 0, mode 0644, uid/gid 0, no user or group name), so the same samples give
    the same bytes on every run and machine.

    >>> with ShardWriter(path) as w:
    ...     w.write(sample)
    >>> w.sha256, w.bytes, w.samples
    """

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "wb")
        self._hash = _HashingWriter(self._file)
        # Imported here: webdataset imports torch (~1.3 s), which only processes writing shards need.
        from webdataset import TarWriter

        # encoder=False: members arrive as bytes (the .npy and json encodings are the format's, above);
        # TarWriter writes a sample's members in sorted extension order, which is MEMBERS.
        self._tar: Any = TarWriter(self._hash, user="", group="", mode=0o644, mtime=0, encoder=False)
        # TarWriter streams (mode "w|"): tarfile copies each member in 16 KB pieces and its stream passes them on
        # in 10 KB records, ~26 writes (and hash updates) per MB, each a Python call. 1 MB pieces and writes give
        # the same bytes (the end-of-archive padding follows tarfile's RECORDSIZE, not these) at 1/100 the calls.
        self._tar.tarstream.copybufsize = _COPY_BYTES
        stream = self._tar.tarstream.fileobj
        if hasattr(stream, "bufsize"):  # tarfile._Stream; left alone if a Python release names it otherwise
            stream.bufsize = _COPY_BYTES
        self.samples = 0
        self.keys: set[str] = set()
        self.rows: list[tuple[str, int, Optional[list[int]]]] = []
        """(key, byte offset of its first header, label_vector or None) of every sample, in write order."""
        self.sha256: Optional[str] = None
        self.bytes = 0

    def write(self, sample: Sample) -> int:
        if self._tar is None:
            raise ValueError(f"{self.path} is closed")
        if not _KEY_OK.match(sample.key):
            raise ValueError(f"invalid sample key {sample.key!r}")
        if sample.key in self.keys:
            raise ValueError(f"duplicate sample key {sample.key!r} in {self.path}")
        self.keys.add(sample.key)
        labels = sample.meta.get("label_vector")
        # The tar stream's own position (it buffers, so the file's lags behind): the first header's offset.
        offset = self._tar.tarstream.offset
        self.rows.append((sample.key, offset, None if labels is None else [int(v) for v in labels]))
        record = {"__key__": sample.key}
        record.update((name[len(sample.key) + 1:], data) for name, data in sample.members())
        n = self._tar.write(record)
        self.samples += 1
        return n

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        self.sha256 = self._hash.sha.hexdigest()
        self.bytes = self._hash.bytes
        self._file.close()
        self._tar = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- reading: the one tar walk -------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One file member of a shard: ``<key>.<ext>`` and where its header and data are."""

    key: str
    ext: str
    offset: int
    """Byte offset of its tar header."""
    offset_data: int
    size: int


def walk_members(f: BinaryIO) -> Iterator[Member]:
    """The file members of a seekable shard stream from its current position, headers only.

    No member data is read: a caller seeks to ``offset_data`` for what it wants, so a
    walk over samples it does not need costs their headers (512 bytes each) only.
    """
    tar = tarfile.open(fileobj=f, mode="r:")  # starts at f.tell(); reads the first header
    while (info := tar.next()) is not None:
        tar.members.clear()  # tarfile keeps every header it saw; a stream may pass 100k
        if not info.isfile():
            continue
        key, _, ext = info.name.partition(".")
        yield Member(key, ext, info.offset, info.offset_data, info.size)


def iter_samples(f: BinaryIO, read: Optional[Container[str]] = None) -> Iterator[tuple[str, int, dict[str, Optional[bytes]]]]:
    """Samples ``(key, offset, members)`` of a seekable shard stream from its current position.

    Consecutive members sharing a key form a sample; ``offset`` is its first header's byte
    offset (where a later read of that sample starts). ``members`` maps each extension to its
    bytes, or to None when ``read`` (a set of extensions; None: all) does not ask for it.
    Raises ShardFormatError for a truncated member and tarfile.TarError for a broken header.
    """
    key: Optional[str] = None
    start = 0
    members: dict[str, Optional[bytes]] = {}
    for m in walk_members(f):
        if m.key != key:
            if key is not None:
                yield key, start, members
            key, start, members = m.key, m.offset, {}
        if read is not None and m.ext not in read:
            members[m.ext] = None
            continue
        f.seek(m.offset_data)
        data = f.read(m.size)
        if len(data) != m.size:
            raise ShardFormatError(f"member {m.key}.{m.ext} truncated ({len(data)} of {m.size} bytes)")
        members[m.ext] = data
    if key is not None:
        yield key, start, members


def iter_tar_samples(f: BinaryIO) -> Iterator[dict[str, Any]]:
    """Every sample of a shard as {'__key__', 'json', 's1.npy', 's2.npy'} (raw bytes), for verification and tests."""
    for key, _, members in iter_samples(f):
        yield {"__key__": key, **members}
