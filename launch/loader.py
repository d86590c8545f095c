"""The training data loader: WebDataset shards streamed from object storage, resumable to the micro batch.

Every sample a rank sees is a pure function of (seed, manifest, world size,
workers per rank, micro batch size, batches consumed), which is what makes
exact resumption and equal step counts possible. Notation: N samples in the
manifest, W ranks, rank r, K loader workers per rank (K=0: in-process, one
stream), mb samples per micro batch.

1. Epoch e orders the shards by ``default_rng([seed, e]).permutation``; the
   shards in that order, with the manifest's sample counts, give N *slots*
   (shard, index in shard).
2. The slots are cut into W contiguous rank ranges and each rank range into K
   contiguous stream ranges (``np.array_split`` sizes, the same every epoch).
   Stream (r, k) reads only the shards overlapping its range; it starts inside a
   shard by walking tar headers, never reading the skipped samples' data.
3. A stream is the concatenation of its epoch-0, epoch-1, ... ranges: infinite,
   so every rank always has a next batch (no collective waits on a rank that ran
   out of data) and batches straddle epoch boundaries.
4. Each epoch range is cut into blocks of ``shuffle_buffer`` slots; a block is
   read whole and emitted in the order ``default_rng([seed, e, r, k, block])``.
5. Stream k forms micro batches of mb consecutive samples; the DataLoader takes
   batches from its K workers round-robin, so rank batch b is stream ``b % K``'s
   batch ``b // K``.
6. The position is just ``batches`` consumed: stream k has produced
   ``ceil((b - k) / K)`` batches, from which the epoch, block and offset follow
   arithmetically. A restart reads at most one block plus the tar headers of
   one shard.

Usage on rank r of a DeepSpeed job::

    loader = ShardLoader.from_config(cfg.data, rank=r, world_size=W,
                                     micro_batch_size=cfg.train.micro_batch_size, seed=cfg.train.seed)
    loader.load_state_dict(checkpoint["dataloader"])     # when resuming
    augment = DeviceAugment(loader.manifest, cfg.data.image_size).to(device)
    for batch in loader:                                  # infinite
        s1, s2, nonfinite = augment(batch, device)        # (B, 2, S, S), (B, C, S, S) float32, normalised

A batch is a dict (see `ShardStream`): ``s1`` (B, 2, H, W) and ``s2`` (B, C, H, W)
in the shards' raw dtypes (uint16 becomes int32), ``keys``, ``crop`` (B, 4)
float32 boxes (y0, x0, h, w) in fractions of the image, ``flip`` (B, 2) bool
(horizontal, vertical), ``epoch``, ``worker``, ``skipped_shards`` /
``skipped_samples`` (cumulative per worker), and ``meta`` with ``with_meta``.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import math
import multiprocessing
import os
import tarfile
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.storage import read_bytes, redact_url, retrying, url_to_fs

try:  # POSIX file locks keep two workers of one node from downloading the same shard twice
    import fcntl
except ImportError:  # pragma: no cover - not Linux: duplicate downloads are harmless, only wasteful
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("launch.loader")

DEFAULT_BLOCK_SIZE = 16 << 20
"""Read-ahead of a remote shard handle: ~8 samples of 2 MB per range request."""
SCAN_BLOCK_SIZE = 64 << 10
"""Read-ahead while walking tar headers to a start sample: headers only, not the skipped data."""
MID_STREAM_RETRIES = 2
"""Reopen a shard at the current sample after this many I/O errors before giving it up."""
MEMBERS = ("json", "s1.npy", "s2.npy")

# Raw dtypes torch holds directly; uint16 becomes int32 on the host (exact, and every torch
# version can move and convert it; torch.uint16 has only partial operator support).
_TORCH_DTYPE = {
    np.dtype("float16"): torch.float16,
    np.dtype("float32"): torch.float32,
    np.dtype("float64"): torch.float64,
    np.dtype("int16"): torch.int16,
    np.dtype("int32"): torch.int32,
    np.dtype("uint8"): torch.uint8,
    np.dtype("uint16"): torch.int32,
}


class LoaderError(RuntimeError):
    """A problem that stops training: a stream whose whole epoch is unreadable, a state from another shard set."""


class ShardError(Exception):
    """A shard that does not match the format or the manifest (skipped, never retried)."""


# -- the manifest -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardInfo:
    name: str
    url: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The parts of a shard set's manifest.json the loader and `DeviceAugment` use."""

    url: str
    shards: tuple[ShardInfo, ...]
    fingerprint: str
    """sha256 of the shard list (names, sample counts, bytes, sha256): what a loader state is valid for."""
    image_size: tuple[int, int]
    """(H, W) of every stored sample, 10 m pixels."""
    modalities: dict[str, Any]
    """{'s1'|'s2': {'bands': [...], 'dtype': 'int16', 'nodata': -1000 | 'non-finite', ...}}."""
    stats: dict[str, Any]
    """{'s1'|'s2': {'mean': [...], 'std': [...]}} per band, over valid pixels."""

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def shape(self, modality: str) -> tuple[int, int, int]:
        return (len(self.modalities[modality]["bands"]), *self.image_size)

    def dtype(self, modality: str) -> np.dtype:
        return np.dtype(self.modalities[modality]["dtype"])


def shard_list_fingerprint(shards: list[dict[str, Any]]) -> str:
    """sha256 of the manifest's shard list, independent of key order and of where the set is stored."""
    canon = [{k: s[k] for k in ("name", "samples", "bytes", "sha256")} for s in shards]
    return hashlib.sha256(json.dumps(canon, sort_keys=True).encode()).hexdigest()


def load_manifest(url: str, storage_options: Optional[dict[str, Any]] = None) -> Manifest:
    """Read and check a shard set's manifest.json; shard URLs are resolved beside it."""
    fs, path = url_to_fs(url, storage_options)
    try:
        raw = json.loads(read_bytes(fs, path))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"manifest not found: {redact_url(url)}") from err
    base = url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else "."
    try:
        shards = tuple(ShardInfo(s["name"], f"{base}/{s['name']}", int(s["samples"]), int(s["bytes"]), s["sha256"])
                       for s in raw["shards"] if int(s["samples"]) > 0)
        size = raw["image_size"]
        image_size = (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))
        modalities = {m: dict(raw["modalities"][m]) for m in ("s1", "s2")}
        stats = {m: dict(raw["stats"][m]) for m in ("s1", "s2")}
        for m in ("s1", "s2"):
            np.dtype(modalities[m]["dtype"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{redact_url(url)}: not a fusmae shard manifest ({type(err).__name__}: {err})") from err
    if not shards:
        raise ValueError(f"{redact_url(url)}: the manifest lists no samples")
    return Manifest(url, shards, shard_list_fingerprint(raw["shards"]), image_size, modalities, stats)


# -- where every sample goes: pure arithmetic -------------------------------------------------


def split_bounds(n: int, parts: int) -> np.ndarray:
    """Boundaries (parts + 1,) of ``n`` items cut into ``parts`` contiguous ranges, as ``np.array_split``."""
    q, rem = divmod(n, parts)
    sizes = np.array([q + 1] * rem + [q] * (parts - rem), dtype=np.int64)
    return np.concatenate([[0], np.cumsum(sizes)])


def shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The shard permutation of ``epoch``."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards)


def stream_range(num_samples: int, rank: int, world_size: int, worker: int, num_workers: int) -> tuple[int, int]:
    """Slots [lo, hi) of stream (rank, worker) in every epoch's slot sequence."""
    rb = split_bounds(num_samples, world_size)
    wb = split_bounds(int(rb[rank + 1] - rb[rank]), num_workers)
    return int(rb[rank] + wb[worker]), int(rb[rank] + wb[worker + 1])


def stream_batches_before(batch: int, worker: int, num_workers: int) -> int:
    """Batches stream ``worker`` has produced when the rank has consumed ``batch``: ceil((batch - worker) / K)."""
    return max(0, -((worker - batch) // num_workers))


def draw_crops(rng: np.random.Generator, n: int, scale_min: float, hflip: bool, vflip: bool,
               hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Random resized crop boxes (n, 4) float32 (y0, x0, h, w) in fractions of the image, flips (n, 2) bool (h, v).

    As torchvision's RandomResizedCrop: area fraction uniform in [scale_min, 1], log aspect
    ratio (w/h in pixels) uniform in [log 3/4, log 4/3], ten tries, else the whole image;
    boxes stay continuous (no rounding to pixels). Always draws the same numbers, so the
    flags do not shift the crops.
    """
    tries = 10
    H, W = hw
    area = rng.uniform(scale_min, 1.0, (n, tries))
    ratio = np.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3), (n, tries)))
    w = np.sqrt(area * ratio * H / W)
    h = np.sqrt(area / ratio * W / H)
    ok = (w <= 1.0) & (h <= 1.0)
    first = np.argmax(ok, axis=1)
    rows = np.arange(n)
    h = np.where(ok.any(axis=1), h[rows, first], 1.0)
    w = np.where(ok.any(axis=1), w[rows, first], 1.0)
    u = rng.random((n, 2))
    crop = np.stack([u[:, 0] * (1 - h), u[:, 1] * (1 - w), h, w], axis=1).astype(np.float32)
    flip = rng.random((n, 2)) < 0.5
    flip[:, 0] &= hflip
    flip[:, 1] &= vflip
    return crop, flip


# -- decoding -------------------------------------------------------------------------------


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}


def npy_view(data: bytes) -> np.ndarray:
    """The array of .npy bytes as a read-only view (``np.frombuffer``, no copy); headers parsed once per kind."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("not an .npy payload (bad magic)")
    if data[6] == 1:
        start, hlen = 10, int.from_bytes(data[8:10], "little")
    elif data[6] in (2, 3):
        start, hlen = 12, int.from_bytes(data[8:12], "little")
    else:
        raise ValueError(f"unsupported .npy version {data[6]}")
    header = data[start:start + hlen]
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        try:
            d = ast.literal_eval(header.decode("latin1"))
            dtype = np.lib.format.descr_to_dtype(d["descr"])
            parsed = (dtype, tuple(int(s) for s in d["shape"]), bool(d["fortran_order"]))
        except Exception as err:  # noqa: BLE001 - any malformed header is a format error
            raise ValueError(f"bad .npy header {header[:80]!r}: {type(err).__name__}: {err}") from None
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed")
        if len(_NPY_HEADERS) < 64:
            _NPY_HEADERS[header] = parsed
    dtype, shape, fortran = parsed
    count = math.prod(shape)
    offset = start + hlen
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f".npy payload truncated: {len(data) - offset} bytes for shape {shape} {dtype}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return arr.reshape(shape, order="F" if fortran else "C")


class RawSample(NamedTuple):
    key: str
    s1: np.ndarray
    """(2, H, W) view on the member bytes."""
    s2: np.ndarray
    """(C, H, W) view on the member bytes."""
    meta: Optional[dict[str, Any]]


# -- the stream of one (rank, worker) ---------------------------------------------------------


@dataclass(frozen=True)
class StreamSpec:
    """Everything a loader worker needs (pickled to worker processes; no open handles)."""

    shards: tuple[ShardInfo, ...]
    fingerprint: str
    s1_shape: tuple[int, int, int]
    s2_shape: tuple[int, int, int]
    s1_dtype: str
    s2_dtype: str
    rank: int
    world_size: int
    num_workers: int
    """Streams per rank (K, at least 1)."""
    micro_batch_size: int
    seed: int
    shuffle_buffer: int
    crop_scale_min: float = 0.35
    hflip: bool = True
    vflip: bool = True
    finite: bool = False
    with_meta: bool = False
    cache_dir: Optional[str] = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    block_size: int = DEFAULT_BLOCK_SIZE
    start_batch: int = 0
    """Rank batch the DataLoader's worker 0 produces first (resumption)."""
    origin_batches: int = 0
    origin_samples: int = 0
    """A layout change restarts the arithmetic at (origin_batches, global samples consumed)."""

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)


class ShardReader:
    """Reads slot ranges of shards for one stream: opening, retrying, caching, skipping bad shards."""

    def __init__(self, spec: StreamSpec):
        self.spec = spec
        self.counts = np.array([s.samples for s in spec.shards], dtype=np.int64)
        self.skipped_shards = 0
        self.skipped_samples = 0
        self.pending_warnings: list[str] = []
        self._in_worker = get_worker_info() is not None
        self._uncacheable: set[str] = set()  # shards whose download did not check out: read from the store

    def warn(self, msg: str) -> None:
        # Worker processes do not share the trainer's logging setup: their warnings travel with
        # the next batch and `ShardLoader` logs them in the main process.
        if self._in_worker:
            self.pending_warnings.append(msg)
        else:
            log.warning(msg)

    def slots(self, order: np.ndarray, lo: int, hi: int) -> Iterator[Optional[RawSample]]:
        """One item per slot in [lo, hi) of the slot sequence of shard ``order``; None for a lost slot."""
        starts = np.concatenate([[0], np.cumsum(self.counts[order])])
        p = int(np.searchsorted(starts, lo, side="right")) - 1
        pos = lo
        while pos < hi:
            shard = self.spec.shards[int(order[p])]
            n = int(min(hi, starts[p + 1]) - pos)
            if n > 0:
                yield from self.segment(shard, int(pos - starts[p]), n)
            pos += n
            p += 1

    def segment(self, shard: ShardInfo, first: int, count: int) -> Iterator[Optional[RawSample]]:
        """Samples [first, first + count) of ``shard``; after a failure, None for each remaining slot."""
        done, attempts = 0, 0
        samples = self._samples(shard, first, count)
        try:
            while done < count:
                try:
                    raw = next(samples)
                except (ShardError, tarfile.TarError, ValueError, KeyError, EOFError, FileNotFoundError,
                        PermissionError, StopIteration) as err:
                    self._give_up(shard, err, count - done)
                    break
                except Exception as err:  # noqa: BLE001 - I/O trouble: reopen at the sample we were at
                    attempts += 1
                    if attempts > MID_STREAM_RETRIES:
                        self._give_up(shard, err, count - done)
                        break
                    log.debug("retrying %s at sample %d: %s", redact_url(shard.url), first + done, err)
                    time.sleep(0.5 * attempts)
                    samples.close()
                    samples = self._samples(shard, first + done, count - done)
                    continue
                done += 1
                yield raw
        finally:
            samples.close()
        for _ in range(count - done):
            yield None

    def _give_up(self, shard: ShardInfo, err: BaseException, lost: int) -> None:
        self.skipped_shards += 1
        self.skipped_samples += lost
        reason = "ended early" if isinstance(err, StopIteration) else f"{type(err).__name__}: {err}"
        self.warn(f"skipping shard {redact_url(shard.url)} (rank {self.spec.rank}): {reason}; "
                  f"{lost} sample(s) of this stream lost")

    # -- one shard ----------------------------------------------------------------------------

    def _location(self, shard: ShardInfo) -> tuple[Any, str]:
        if self.spec.cache_dir and shard.name not in self._uncacheable:
            local = self._cached(shard)
            if local is not None:
                return url_to_fs(local)
        return url_to_fs(shard.url, self.spec.storage_options)

    def _samples(self, shard: ShardInfo, first: int, count: int) -> Iterator[RawSample]:
        """Decode samples [first, first + count) of ``shard``; raises on any deviation from the format."""
        fs, path = self._location(shard)
        offset = self._sample_offset(fs, path, first) if first else 0
        with retrying(fs.open)(path, "rb", block_size=self.spec.block_size) as f:
            f.seek(offset)
            tar = tarfile.open(fileobj=f, mode="r:")  # reads headers from the current position
            members: dict[str, Optional[bytes]] = {}
            key: Optional[str] = None
            n = 0
            while True:
                info = tar.next()
                tar.members.clear()  # tarfile keeps every header it saw; a stream may pass 100k
                name_key = None if info is None else info.name.partition(".")[0]
                if key is not None and name_key != key:
                    yield self._decode(key, members)
                    n += 1
                    if n == count:
                        return
                    members = {}
                if info is None:
                    break
                if not info.isfile():
                    continue
                key = name_key
                ext = info.name[len(name_key) + 1:]
                if ext == "json" and not self.spec.with_meta:
                    members[ext] = None  # present is enough; not read
                    continue
                f.seek(info.offset_data)
                data = f.read(info.size)
                if len(data) != info.size:
                    raise ShardError(f"member {info.name} truncated ({len(data)} of {info.size} bytes)")
                members[ext] = data
        raise ShardError(f"ended after {first + n} samples; the manifest lists {shard.samples}")

    def _sample_offset(self, fs: Any, path: str, index: int) -> int:
        """Byte offset of sample ``index``'s first tar header, walking headers with a small read-ahead."""
        with retrying(fs.open)(path, "rb", block_size=SCAN_BLOCK_SIZE) as f:
            tar = tarfile.open(fileobj=f, mode="r:")
            seen, key = -1, None
            while (info := tar.next()) is not None:
                tar.members.clear()
                k = info.name.partition(".")[0]
                if k != key:
                    key, seen = k, seen + 1
                    if seen == index:
                        return info.offset
        raise ShardError(f"has {seen + 1} samples; the manifest lists {index + 1} or more")

    def _decode(self, key: str, members: dict[str, Optional[bytes]]) -> RawSample:
        missing = [m for m in MEMBERS if m not in members]
        if missing:
            raise ShardError(f"sample {key}: missing member(s) {missing}")
        spec = self.spec
        s1 = npy_view(members["s1.npy"])  # type: ignore[arg-type]
        s2 = npy_view(members["s2.npy"])  # type: ignore[arg-type]
        for name, arr, shape, dtype in (("s1", s1, spec.s1_shape, spec.s1_dtype),
                                        ("s2", s2, spec.s2_shape, spec.s2_dtype)):
            if arr.shape != shape or arr.dtype != np.dtype(dtype):
                raise ShardError(f"sample {key}: {name} is {arr.shape} {arr.dtype}, the manifest says {shape} {dtype}")
        meta = json.loads(members["json"]) if spec.with_meta else None  # type: ignore[arg-type]
        return RawSample(key, s1, s2, meta)

    def _cached(self, shard: ShardInfo) -> Optional[str]:
        """The local copy of ``shard``, downloaded and checked first if needed; None if it did not check out."""
        folder = os.path.join(self.spec.cache_dir, self.spec.fingerprint)  # type: ignore[arg-type]
        dest = os.path.join(folder, shard.name)
        if _size(dest) == shard.bytes:
            return dest
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f".{shard.name}.lock"), "a+b") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if _size(dest) == shard.bytes:  # another worker of this node fetched it meanwhile
                return dest
            fs, path = url_to_fs(shard.url, self.spec.storage_options)
            try:
                if retrying(self._download)(fs, path, shard, dest):
                    return dest
            except Exception as err:  # noqa: BLE001 - fall back to reading the store directly
                self.warn(f"cannot cache {redact_url(shard.url)}: {type(err).__name__}: {err}")
        self._uncacheable.add(shard.name)
        return None

    def _download(self, fs: Any, path: str, shard: ShardInfo, dest: str) -> bool:
        tmp = f"{os.path.dirname(dest)}/.{shard.name}.{uuid.uuid4().hex}.tmp"
        sha, size = hashlib.sha256(), 0
        try:
            with fs.open(path, "rb", block_size=self.spec.block_size) as src, open(tmp, "wb") as out:
                while chunk := src.read(self.spec.block_size):
                    sha.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            if size != shard.bytes or sha.hexdigest() != shard.sha256:
                self.warn(f"not caching {redact_url(shard.url)}: {size} bytes, sha256 {sha.hexdigest()[:12]}…, "
                          f"the manifest says {shard.bytes} bytes, {shard.sha256[:12]}…")
                return False
            os.replace(tmp, dest)  # atomic: readers see the whole checked file or nothing
            return True
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


class ShardStream(IterableDataset):
    """The batches of one rank: in a DataLoader worker, the stream that worker plays; in-process, stream 0.

    Yields dicts ``s1`` (B, 2, H, W), ``s2`` (B, C, H, W) torch tensors in the shards' dtypes
    (uint16 as int32), ``keys`` list[str], ``crop`` (B, 4) float32 (y0, x0, h, w) fractions,
    ``flip`` (B, 2) bool (horizontal, vertical), ``epoch`` (of the first sample), ``worker``
    (the stream k), ``batch_index`` (in the stream), ``skipped_shards`` / ``skipped_samples``
    (cumulative for this worker), ``warnings`` (new since the last batch), and ``meta``
    (list of dicts) when ``with_meta``.
    """

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def _worker(self) -> int:
        """The stream this process plays: DataLoader worker j takes rank batches start + j, start + j + K, ..."""
        info = get_worker_info()
        if info is None:
            if self.spec.num_workers != 1:
                raise LoaderError("ShardStream with several streams must run in DataLoader workers")
            return 0
        if info.num_workers != self.spec.num_workers:
            raise LoaderError(f"DataLoader has {info.num_workers} workers, the stream plan {self.spec.num_workers}")
        return (self.spec.start_batch + info.id) % self.spec.num_workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        k = self._worker()
        reader = ShardReader(self.spec)
        if self.spec.finite:
            yield from self._finite(reader, k)
        else:
            yield from self._infinite(reader, k)

    # -- training: infinite, shuffled, augmented ------------------------------------------------

    def _infinite(self, reader: ShardReader, k: int) -> Iterator[dict[str, Any]]:
        spec = self.spec
        K, mb = spec.num_workers, spec.micro_batch_size
        lo, hi = stream_range(spec.num_samples, spec.rank, spec.world_size, k, K)
        length = hi - lo
        if length == 0:
            raise LoaderError(f"stream (rank {spec.rank}, worker {k}) has no samples: {spec.num_samples} samples "
                              f"for {spec.world_size} ranks x {K} workers")
        # Position in this stream's sample sequence, from the batches consumed (see the module docstring).
        first_batch = spec.start_batch + (k - spec.start_batch) % K
        index = stream_batches_before(first_batch, k, K)
        epoch0, offset0 = divmod(spec.origin_samples, spec.num_samples)
        position = epoch0 * length + offset0 * length // spec.num_samples
        position += (index - stream_batches_before(spec.origin_batches, k, K)) * mb
        samples = self._shuffled(reader, k, lo, length, position)
        while True:
            items = [next(samples) for _ in range(mb)]
            rng = np.random.default_rng([spec.seed, items[0][0], spec.rank, k, index, 1])
            crop, flip = draw_crops(rng, mb, spec.crop_scale_min, spec.hflip, spec.vflip, spec.s2_shape[1:])
            yield self._batch(reader, k, index, items, crop, flip)
            index += 1

    def _shuffled(self, reader: ShardReader, k: int, lo: int, length: int,
                  position: int) -> Iterator[tuple[int, RawSample]]:
        """(epoch, sample) from stream position ``position`` on, forever; reads at most one block to start."""
        spec = self.spec
        B = max(1, spec.shuffle_buffer)
        epoch, offset = divmod(position, length)
        while True:
            order = shard_order(len(spec.shards), spec.seed, epoch)
            block0, skip = divmod(offset, B)
            slots = reader.slots(order, lo + block0 * B, lo + length)
            emitted = 0
            for block in range(block0, -(-length // B)):
                n = min(B, length - block * B)
                items = [next(slots) for _ in range(n)]
                perm = np.random.default_rng([spec.seed, epoch, spec.rank, k, block]).permutation(n)
                for p in perm[skip:]:
                    if items[p] is not None:
                        emitted += 1
                        yield epoch, items[p]
                skip = 0
            if offset == 0 and emitted == 0:
                raise LoaderError(f"stream (rank {spec.rank}, worker {k}) read no sample in epoch {epoch}: every "
                                  f"shard of its range failed ({reader.skipped_shards} shard failures so far)")
            epoch, offset = epoch + 1, 0

    # -- evaluation: one pass, manifest order, no augmentation -----------------------------------

    def _finite(self, reader: ShardReader, k: int) -> Iterator[dict[str, Any]]:
        spec = self.spec
        lo, hi = stream_range(spec.num_samples, spec.rank, spec.world_size, k, spec.num_workers)
        order = np.arange(len(spec.shards))
        items: list[tuple[int, RawSample]] = []
        index = 0
        for raw in reader.slots(order, lo, hi):
            if raw is not None:
                items.append((0, raw))
            if len(items) == spec.micro_batch_size:
                yield self._batch(reader, k, index, items, *self._full(len(items)))
                items, index = [], index + 1
        if items:
            yield self._batch(reader, k, index, items, *self._full(len(items)))
        for msg in reader.pending_warnings:  # no batch left to carry them: straight to the worker's stderr
            log.warning(msg)

    @staticmethod
    def _full(n: int) -> tuple[np.ndarray, np.ndarray]:
        return np.tile(np.array([0, 0, 1, 1], np.float32), (n, 1)), np.zeros((n, 2), bool)

    # -- assembly ----------------------------------------------------------------------------

    def _batch(self, reader: ShardReader, k: int, index: int, items: list[tuple[int, RawSample]],
               crop: np.ndarray, flip: np.ndarray) -> dict[str, Any]:
        spec = self.spec
        n = len(items)
        s1 = _new_tensor((n, *spec.s1_shape), _TORCH_DTYPE[np.dtype(spec.s1_dtype)])
        s2 = _new_tensor((n, *spec.s2_shape), _TORCH_DTYPE[np.dtype(spec.s2_dtype)])
        s1_np, s2_np = s1.numpy(), s2.numpy()
        for i, (_, raw) in enumerate(items):  # the one copy: member bytes → batch (in shared memory in workers)
            s1_np[i] = raw.s1
            s2_np[i] = raw.s2
        batch: dict[str, Any] = {
            "s1": s1,
            "s2": s2,
            "keys": [raw.key for _, raw in items],
            "crop": torch.from_numpy(crop),
            "flip": torch.from_numpy(flip),
            "epoch": items[0][0],
            "worker": k,
            "batch_index": index,
            "skipped_shards": reader.skipped_shards,
            "skipped_samples": reader.skipped_samples,
            "warnings": reader.pending_warnings,
        }
        reader.pending_warnings = []
        if spec.with_meta:
            batch["meta"] = [raw.meta for _, raw in items]
        return batch


def _new_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a worker, directly in shared memory so the hand-over copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device=proto.device)
    return proto.new(storage).resize_(shape)


def _keep(batch: Any) -> Any:
    """collate_fn for batch_size=None: batches arrive collated."""
    return batch


def _sync_environ(environ: dict[str, str], worker_id: int) -> None:
    """Give a worker the trainer's environment as of the DataLoader's creation.

    A forkserver child inherits the server's environment from when the server started,
    which can predate variables the trainer set later (AWS_ENDPOINT_URL, credentials).
    """
    for key in set(os.environ) - set(environ):
        del os.environ[key]
    os.environ.update(environ)


def default_multiprocessing_context() -> str:
    """fork where available (PyTorch's own default on Linux): workers start at once and are children of
    the rank, so they exit with it when a launcher kills the rank. A forkserver's workers are children of
    the server instead and outlive a killed rank. spawn elsewhere."""
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


# -- the rank's loader -------------------------------------------------------------------------


STATE_KEYS = ("batches", "rank", "world_size", "num_workers", "micro_batch_size", "seed", "shuffle_buffer",
              "manifest_fingerprint")


class ShardLoader:
    """The micro batches of one rank, with a resumable position (see the module docstring).

    Iterating yields batch dicts (see `ShardStream`) forever (or one pass with
    ``finite=True``); ``state_dict()`` after consuming b batches and
    ``load_state_dict`` in a new loader make its next batch batch b of an
    uninterrupted run.
    """

    def __init__(
        self,
        manifest: Union[str, Manifest],
        *,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        seed: int = 0,
        shuffle_buffer: int = 256,
        crop_scale_min: float = 0.35,
        hflip: bool = True,
        vflip: bool = True,
        cache_dir: Optional[str] = None,
        storage_options: Optional[dict[str, Any]] = None,
        finite: bool = False,
        with_meta: Optional[bool] = None,
        start_batch: int = 0,
        prefetch_factor: int = 2,
        pin_memory: Optional[bool] = None,
        multiprocessing_context: Optional[str] = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        timeout: float = 0.0,
    ):
        """
        manifest: URL of manifest.json (or a loaded `Manifest`); shards are read beside it.
        num_workers: K loader processes for this rank (0: in the calling process, one stream).
        with_meta: parse each sample's json into ``batch['meta']``; default: only when ``finite``.
        start_batch: resume after this many consumed batches (as ``load_state_dict`` with the same layout).
        multiprocessing_context: 'fork' (default on Linux), 'spawn' or 'forkserver'.
        timeout: seconds the DataLoader waits for a batch before raising (0: forever).
        """
        storage_options = dict(storage_options or {})
        self.manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest, storage_options)
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if num_workers < 0 or seed < 0 or start_batch < 0:
            raise ValueError("num_workers, seed and start_batch must be >= 0")
        streams = max(1, num_workers)
        n = self.manifest.num_samples
        if not finite and n < world_size * streams:
            raise ValueError(f"{redact_url(self.manifest.url)} has {n} samples, fewer than world_size x num_workers "
                             f"= {world_size * streams}: some stream would have none")
        self.num_workers = num_workers
        self.finite = finite
        self.prefetch_factor = prefetch_factor
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.multiprocessing_context = multiprocessing_context or default_multiprocessing_context()
        self.timeout = timeout
        m = self.manifest
        self.spec = StreamSpec(
            shards=m.shards, fingerprint=m.fingerprint, s1_shape=m.shape("s1"), s2_shape=m.shape("s2"),
            s1_dtype=str(m.dtype("s1")), s2_dtype=str(m.dtype("s2")), rank=rank, world_size=world_size,
            num_workers=streams, micro_batch_size=micro_batch_size, seed=seed, shuffle_buffer=max(1, shuffle_buffer),
            crop_scale_min=crop_scale_min, hflip=hflip, vflip=vflip, finite=finite,
            with_meta=finite if with_meta is None else with_meta, cache_dir=cache_dir,
            storage_options=storage_options, block_size=block_size,
        )
        self._batches = start_batch
        self._generation = 0
        self._skipped: dict[int, tuple[int, int]] = {}
        self._finite_loader: Optional[DataLoader] = None

    @classmethod
    def from_config(cls, data: Any, *, rank: int, world_size: int, micro_batch_size: int, seed: int,
                    **kwargs: Any) -> "ShardLoader":
        """From a `launch.config.DataConfig` (manifest, num_workers, shuffle_buffer, crops, flips, cache)."""
        return cls(data.manifest, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
                   num_workers=data.num_workers, seed=seed, shuffle_buffer=data.shuffle_buffer,
                   crop_scale_min=data.crop_scale_min, hflip=data.hflip, vflip=data.vflip,
                   cache_dir=data.cache_dir, storage_options=dict(data.storage_options), **kwargs)

    # -- position ------------------------------------------------------------------------------

    @property
    def batches(self) -> int:
        """Micro batches this rank has consumed (yielded) so far."""
        return self._batches

    @property
    def samples_consumed(self) -> int:
        """Samples all ranks have consumed together (every rank consumes the same number of batches)."""
        s = self.spec
        return s.origin_samples + (self._batches - s.origin_batches) * s.micro_batch_size * s.world_size

    @property
    def skipped(self) -> dict[str, int]:
        """Shard failures and lost samples reported by this rank's workers (summed; since this loader started)."""
        return {"shards": sum(v[0] for v in self._skipped.values()),
                "samples": sum(v[1] for v in self._skipped.values())}

    def state_dict(self) -> dict[str, Any]:
        s = self.spec
        return {
            "batches": self._batches,
            "rank": s.rank,
            "world_size": s.world_size,
            "num_workers": s.num_workers,
            "micro_batch_size": s.micro_batch_size,
            "seed": s.seed,
            "shuffle_buffer": s.shuffle_buffer,
            "manifest_fingerprint": s.fingerprint,
            "origin_batches": s.origin_batches,
            "origin_samples": s.origin_samples,
            "samples_consumed": self.samples_consumed,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue where ``state`` (from any rank of the saving run) left off.

        Same world size, workers, micro batch, seed and shuffle buffer: the next batch is
        exactly the one the saving run would have produced. Otherwise: continue at the same
        fraction of the global sample stream (samples consumed by all ranks), with a warning.
        Another shard set: `LoaderError`.
        """
        if self.finite:
            raise LoaderError("a finite (evaluation) loader has no position to restore")
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise LoaderError(f"loader state lacks {missing}")
        s = self.spec
        if state["manifest_fingerprint"] != s.fingerprint:
            raise LoaderError(
                f"the loader state was saved for another shard set "
                f"(fingerprint {state['manifest_fingerprint'][:12]}…); "
                f"{redact_url(self.manifest.url)} has {s.fingerprint[:12]}…. Resume with the same manifest, "
                "or start the data position fresh (drop the dataloader state)")
        batches = int(state["batches"])
        origin_batches = int(state.get("origin_batches", 0))
        origin_samples = int(state.get("origin_samples", 0))
        layout = ("world_size", "num_workers", "micro_batch_size", "seed", "shuffle_buffer")
        saved = {k: max(1, int(state[k])) if k == "num_workers" else int(state[k]) for k in layout}
        ours = {k: getattr(s, k) for k in layout}
        if saved != ours:
            # Global samples consumed by the saving run; the new layout starts every stream at that
            # epoch and the same fraction of its range, counting batches on from the saved count.
            consumed = origin_samples + (batches - origin_batches) * saved["micro_batch_size"] * saved["world_size"]
            changed = {k: (saved[k], ours[k]) for k in layout if saved[k] != ours[k]}
            epoch, offset = divmod(consumed, s.num_samples)
            log.warning("loader state from another layout %s: continuing at epoch %d, %.1f%% through (%d samples "
                        "consumed by all ranks); batches are not identical to an uninterrupted run",
                        changed, epoch, 100.0 * offset / s.num_samples, consumed)
            origin_batches, origin_samples = batches, consumed
        self.spec = replace(s, origin_batches=origin_batches, origin_samples=origin_samples)
        self._batches = batches
        self._generation += 1

    # -- iteration -----------------------------------------------------------------------------

    def _dataloader(self, spec: StreamSpec) -> DataLoader:
        dataset = ShardStream(spec)
        if self.num_workers == 0:
            return DataLoader(dataset, batch_size=None, collate_fn=_keep, pin_memory=self.pin_memory)
        ctx = multiprocessing.get_context(self.multiprocessing_context)
        if self.multiprocessing_context == "forkserver":
            # The server imports the main module and the loader once; each worker then forks from
            # it in milliseconds instead of importing torch (and the trainer's imports) again.
            ctx.set_forkserver_preload(["__main__", "launch.loader"])
        return DataLoader(
            dataset,
            batch_size=None,
            collate_fn=_keep,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor,
            # Training: one DataLoader iterator lives for the whole run, and a restart needs workers
            # that start at a new position, so persistence buys nothing. Evaluation passes reuse them.
            persistent_workers=self.finite,
            pin_memory=self.pin_memory,
            multiprocessing_context=ctx,
            worker_init_fn=functools.partial(_sync_environ, dict(os.environ)),
            timeout=self.timeout,
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.finite:
            if self._finite_loader is None:
                self._finite_loader = self._dataloader(self.spec)
            for batch in self._finite_loader:
                yield self._receive(batch)
            return
        generation = self._generation
        for batch in self._dataloader(replace(self.spec, start_batch=self._batches)):
            if generation != self._generation:
                raise LoaderError("load_state_dict was called during iteration; iterate the loader anew")
            self._batches += 1
            yield self._receive(batch)

    def _receive(self, batch: dict[str, Any]) -> dict[str, Any]:
        for msg in batch.pop("warnings", ()):
            log.warning("loader worker %d: %s", batch["worker"], msg)
        self._skipped[batch["worker"]] = (batch["skipped_shards"], batch["skipped_samples"])
        return batch

    def __len__(self) -> int:
        """Batches of this rank in one finite pass (without unreadable shards)."""
        if not self.finite:
            raise TypeError("a training ShardLoader is infinite; count steps, not batches")
        s = self.spec
        total = 0
        for k in range(s.num_workers):
            lo, hi = stream_range(s.num_samples, s.rank, s.world_size, k, s.num_workers)
            total += -(-(hi - lo) // s.micro_batch_size)
        return total
