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

import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterator, Optional

import numpy as np

SHARD_NAME = "{split}-{index:06d}.tar"
_KEY_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


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
    return np.load(io.BytesIO(data), allow_pickle=False)


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

    def tell(self) -> int:  # tarfile asks for the position when it opens the stream
        return self.bytes

    def write(self, b) -> int:  # type: ignore[override]
        self.sha.update(b)
        self.bytes += len(b)
        return self.f.write(b)


class ShardWriter:
    """Write samples into one deterministic tar file, hashing on the fly.

    >>> with ShardWriter(path) as w:
    ...     w.write(sample)
    >>> w.sha256, w.bytes, w.samples
    """

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "wb")
        self._hash = _HashingWriter(self._file)
        self._tar = tarfile.open(fileobj=self._hash, mode="w", format=tarfile.GNU_FORMAT)
        self.samples = 0
        self.keys: set[str] = set()
        self.sha256: Optional[str] = None
        self.bytes = 0

    def write(self, sample: Sample) -> int:
        if not _KEY_OK.match(sample.key):
            raise ValueError(f"invalid sample key {sample.key!r}")
        if sample.key in self.keys:
            raise ValueError(f"duplicate sample key {sample.key!r} in {self.path}")
        self.keys.add(sample.key)
        n = 0
        for name, data in sample.members():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
            n += len(data)
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
        self._tar = None  # type: ignore[assignment]

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_tar_samples(f: BinaryIO) -> Iterator[dict[str, Any]]:
    """Group the members of a shard stream by key: {'__key__', 'json', 's1.npy', 's2.npy'} (raw bytes).

    A small reader without webdataset, for verification and tests.
    """
    current: dict[str, Any] = {}
    with tarfile.open(fileobj=f, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            name = info.name
            key, _, ext = name.partition(".")
            data = tar.extractfile(info).read()  # type: ignore[union-attr]
            if current and current["__key__"] != key:
                yield current
                current = {}
            current.setdefault("__key__", key)
            current[ext] = data
    if current:
        yield current
