"""Reading shards for one loader stream: opening, retrying, caching, skipping bad shards.

A stream asks for slot ranges of a shard order (`ShardReader.slots`) and gets one
item per slot: a `RawSample`, or None for a slot whose shard failed. Two ways to
find a slot's bytes:

- sequential: slot i of a shard is its i-th sample, reached by walking tar
  headers from the start (the skipped samples' data is never read);
- a `Selection`: slot i of a shard is the i-th selected sample, read at its
  recorded byte offset, so only the selected samples' bytes are read.

Errors are of two kinds: the format (a truncated member, a wrong shape, fewer
samples than the manifest says) skips the rest of the shard's slots and counts
them; I/O errors reopen the shard at the sample it was at, a few times, before
the shard is given up the same way.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import random
import tarfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Iterator, NamedTuple, Optional, Union

import numpy as np
from torch.utils.data import get_worker_info

from pipeline.manifest import ShardInfo
from launch.data.buffers import NPY_HEADER_ROOM, SampleArena
from pipeline.shards import MEMBERS, Member, ShardFormatError, iter_samples, npy_layout, npy_view
from pipeline.storage import (StorageUnavailable, is_local, is_transient, read_range, redact_url, retry_window_s,
                              retrying, url_to_fs)

try:  # POSIX file locks keep two workers of one node from downloading the same shard twice
    import fcntl
except ImportError:  # pragma: no cover - not Linux: duplicate downloads are harmless, only wasteful
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("launch.data.reader")


class ShardError(Exception):
    """A shard that does not match the format or the manifest (skipped, never retried)."""


DEFAULT_BLOCK_SIZE = 16 << 20
"""Read-ahead of a shard read sequentially: ~8 samples of 2 MB per range request."""
SPARSE_BLOCK_SIZE = 64 << 10
"""Read-ahead while walking tar headers to a start sample, and for selected samples read by offset."""
HEADER_BLOCK_SIZE = 1 << 10
"""Read-ahead of a metadata-only pass (headers and json members; the arrays are skipped)."""
MID_STREAM_RETRIES = 2
"""Reopen a shard at the current sample after this many non-transient I/O errors before giving it up."""
CONTENT_ERRORS = (ShardError, ShardFormatError, tarfile.TarError, ValueError, KeyError, EOFError, FileNotFoundError,
                  PermissionError, StopIteration)


class ArrayAt(NamedTuple):
    """An array not read yet: ``dtype`` and ``shape`` C-order payload bytes at ``offset`` of the local file ``path``."""

    path: str
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]


ARRAYS = frozenset({"s1.npy", "s2.npy"})
LOCAL_HEADER_BUFFER = 8 << 10
"""Read-ahead of a local shard's header walk: a tar header and the .npy header right after it; the arrays'
bytes are read later, straight into the batch."""
OPEN_FILES = 32
"""Local shards a reader keeps open for the reads of its shuffle buffer."""


class RawSample(NamedTuple):
    key: str
    s1: Optional[Union[np.ndarray, ArrayAt]]
    """(2, H, W): where it lies in a local file, or a view on the member bytes in the reader's arena (valid until
    ``keep`` more samples were read); None in a metadata-only pass. `ShardReader.copy_into` takes either."""
    s2: Optional[Union[np.ndarray, ArrayAt]]
    """(C, H, W), as ``s1``."""
    meta: Optional[dict[str, Any]]
    shard: str
    """Name of the shard it came from."""
    offset: int
    """Byte offset of its first tar header in that shard: where `Selection` reads it again."""


@dataclass(frozen=True)
class Selection:
    """A subset of a shard set's samples: for each shard name, the byte offsets of the selected samples."""

    offsets: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, positions: list[tuple[str, int]]) -> "Selection":
        """From (shard name, byte offset) pairs, e.g. the ``positions`` a metadata pass reported."""
        out: dict[str, list[int]] = {}
        for name, offset in positions:
            out.setdefault(name, []).append(int(offset))
        return cls({k: tuple(sorted(v)) for k, v in out.items()})

    @property
    def num_samples(self) -> int:
        return sum(len(v) for v in self.offsets.values())

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(sorted(self.offsets.items())).encode()).hexdigest()


@dataclass(frozen=True)
class ReadSpec:
    """What a reader needs (pickled to worker processes; no open handles)."""

    shards: tuple[ShardInfo, ...]
    fingerprint: str
    s1_shape: tuple[int, int, int]
    s2_shape: tuple[int, int, int]
    s1_dtype: str
    s2_dtype: str
    rank: int = 0
    images: bool = True
    """Read and check the arrays; False: keys, positions and json only (a metadata pass)."""
    with_meta: bool = False
    offsets: Optional[tuple[tuple[int, ...], ...]] = None
    """Per shard, the byte offsets of the selected samples (a `Selection`); None: every sample."""
    cache_dir: Optional[str] = None
    storage_options: dict[str, Any] = field(default_factory=dict)
    block_size: int = DEFAULT_BLOCK_SIZE

    def counts(self) -> np.ndarray:
        """Slots per shard."""
        if self.offsets is None:
            return np.array([s.samples for s in self.shards], dtype=np.int64)
        return np.array([len(o) for o in self.offsets], dtype=np.int64)

    def members_to_read(self) -> set[str]:
        return ({"s1.npy", "s2.npy"} if self.images else set()) | ({"json"} if self.with_meta else set())

    def array_bytes(self) -> dict[str, int]:
        """Bytes of each array member's payload the manifest promises (without the .npy header)."""
        return {f"{name}.npy": int(np.prod(shape)) * np.dtype(dtype).itemsize
                for name, shape, dtype in (("s1", self.s1_shape, self.s1_dtype), ("s2", self.s2_shape, self.s2_dtype))}


class ShardReader:
    """Reads slot ranges of shards for one stream (see the module docstring).

    A sample's arrays are views on a `SampleArena`: they stay valid until ``keep`` more
    samples were read (the stream's shuffle buffer; 1 for a stream that copies each sample
    into its batch at once)."""

    def __init__(self, spec: ReadSpec, keep: int = 1):
        self.spec = spec
        self.arena = SampleArena(keep, spec.array_bytes())
        self._fds: dict[str, int] = {}
        self._scratches: dict[str, np.ndarray] = {}
        self.counts = spec.counts()
        self.read = spec.members_to_read()
        self.skipped_shards = 0
        self.skipped_samples = 0
        self.pending_warnings: list[str] = []
        self._in_worker = get_worker_info() is not None
        self._uncacheable: set[str] = set()  # shards whose download did not check out: read from the store

    def warn(self, msg: str) -> None:
        # Worker processes do not share the trainer's logging setup: their warnings travel with
        # the next batch and the loader logs them in the main process.
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
            index = int(order[p])
            n = int(min(hi, starts[p + 1]) - pos)
            if n > 0:
                yield from self.segment(index, int(pos - starts[p]), n)
            pos += n
            p += 1

    def segment(self, index: int, first: int, count: int) -> Iterator[Optional[RawSample]]:
        """Slots [first, first + count) of shard ``index``; after a content error, None for each remaining slot.

        Transient storage errors (connection trouble, timeouts, throttling, 5xx) reopen the shard at the
        sample it was at, for up to the retry window, and then stop the run (`StorageUnavailable`): an
        outage never turns into skipped data. Other I/O errors reopen it a few times and are then treated
        as content errors."""
        shard = self.spec.shards[index]
        done, attempts, outage = 0, 0, None
        samples = self._samples(index, first, count)
        try:
            while done < count:
                try:
                    raw = next(samples)
                except StorageUnavailable as err:  # a storage call already waited out the whole window: stop
                    raise StorageUnavailable(f"reading {redact_url(shard.url)} (rank {self.spec.rank}): {err}") from err
                except CONTENT_ERRORS as err:
                    self._give_up(shard, err, count - done)
                    break
                except Exception as err:  # noqa: BLE001 - I/O trouble: reopen at the sample we were at
                    if is_transient(err):
                        outage = outage or time.monotonic()
                        self._wait_out(shard, err, outage, attempts)
                    elif attempts >= MID_STREAM_RETRIES:
                        self._give_up(shard, err, count - done)
                        break
                    attempts += 1
                    log.debug("retrying %s at sample %d: %s", redact_url(shard.url), first + done, err)
                    samples.close()
                    samples = self._samples(index, first + done, count - done)
                    continue
                if outage is not None:
                    self.warn(f"reading {redact_url(shard.url)} again after {time.monotonic() - outage:.0f} s")
                    outage, attempts = None, 0
                done += 1
                self.arena.advance()  # the next sample goes to the next slot; a retried one rewrote its own
                yield raw
        finally:
            samples.close()
        for _ in range(count - done):
            yield None

    def _wait_out(self, shard: ShardInfo, err: BaseException, since: float, attempts: int) -> None:
        """Sleep before the next attempt of an outage that began at ``since``; past the window, stop the run."""
        window = retry_window_s()
        waited = time.monotonic() - since
        shown = redact_url(f"{type(err).__name__}: {err}")
        if waited > window:
            raise StorageUnavailable(f"{redact_url(shard.url)} (rank {self.spec.rank}): unreachable for "
                                     f"{waited:.0f} s, longer than the retry window ({window:.0f} s): {shown}")
        if attempts == 0:
            self.warn(f"storage trouble reading {redact_url(shard.url)}: {shown}; retrying for up to {window:.0f} s")
        time.sleep(min(20.0, 0.2 * 2 ** min(attempts, 7)) * random.uniform(0.5, 1.0))

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

    def _samples(self, index: int, first: int, count: int) -> Iterator[RawSample]:
        """Decode slots [first, first + count) of shard ``index``; raises on any deviation from the format.

        On a local file (a path, file://, or the node cache) the arrays are only located here, their
        .npy headers checked, and their bytes read later straight into the batch (`copy_into`):
        one copy from the page cache, and a shuffle buffer that holds positions, not bytes. Elsewhere
        they are read here, into the reader's arena."""
        shard = self.spec.shards[index]
        fs, path = self._location(shard)
        local = is_local(fs) and self.spec.images
        selected = self.spec.offsets[index][first:first + count] if self.spec.offsets is not None else None
        if local:
            block = LOCAL_HEADER_BUFFER
        elif selected is not None:
            block = SPARSE_BLOCK_SIZE
        else:
            block = self.spec.block_size if self.spec.images else HEADER_BLOCK_SIZE
        opened = open(path, "rb", buffering=block) if local else retrying(fs.open)(path, "rb", block_size=block)
        with opened as f:
            end = os.fstat(f.fileno()).st_size if local else shard.bytes
            walk = functools.partial(iter_samples, f, self.read, into=None if local else self.arena.region,
                                     locate=ARRAYS if local else ())
            if selected is not None:
                for offset in selected:
                    f.seek(offset)
                    found = next(walk(), None)
                    if found is None or found[1] != offset:
                        raise ShardError(f"no sample at byte {offset}: the selection does not fit this shard")
                    yield self._decode(shard, path, f, end, *found)
                return
            if first:
                f.seek(self._sample_offset(fs, path, first))
            n = 0
            for key, start, members in walk():
                yield self._decode(shard, path, f, end, key, start, members)
                n += 1
                if n == count:
                    return
        raise ShardError(f"ended after {first + n} samples; the manifest lists {shard.samples}")

    def _sample_offset(self, fs: Any, path: str, index: int) -> int:
        """Byte offset of sample ``index``'s first tar header, walking headers with a small read-ahead."""
        seen = 0
        with retrying(fs.open)(path, "rb", block_size=SPARSE_BLOCK_SIZE) as f:
            for _, start, _ in iter_samples(f, read=()):
                if seen == index:
                    return start
                seen += 1
        raise ShardError(f"has {seen} samples; the manifest lists {index + 1} or more")

    def _decode(self, shard: ShardInfo, path: str, f: Any, end: int, key: str, offset: int,
                members: dict[str, Any]) -> RawSample:
        missing = [m for m in MEMBERS if m not in members]
        if missing:
            raise ShardError(f"sample {key}: missing member(s) {missing}")
        spec = self.spec
        arrays: dict[str, Any] = {"s1": None, "s2": None}
        if spec.images:
            for name, shape, dtype in (("s1", spec.s1_shape, spec.s1_dtype), ("s2", spec.s2_shape, spec.s2_dtype)):
                data = members[f"{name}.npy"]
                arr = arrays[name] = self._locate(path, f, end, data, key) if isinstance(data, Member) else npy_view(data)
                if arr.shape != shape or arr.dtype != np.dtype(dtype):
                    raise ShardError(f"sample {key}: {name} is {arr.shape} {arr.dtype}, the manifest says "
                                     f"{shape} {dtype}")
        meta = json.loads(members["json"]) if spec.with_meta else None
        return RawSample(key, arrays["s1"], arrays["s2"], meta, shard.name, offset)

    def _locate(self, path: str, f: Any, end: int, m: Member, key: str) -> Union["ArrayAt", np.ndarray]:
        """Where the array of member ``m`` lies in the local file, from its .npy header; or the array itself
        (read into the arena) when it is not a plain C-order payload that a batch row can take as bytes."""
        if m.offset_data + m.size > end:
            raise ShardFormatError(f"member {key}.{m.ext} truncated ({max(0, end - m.offset_data)} of {m.size} bytes)")
        f.seek(m.offset_data)
        dtype, shape, fortran, skip = npy_layout(f.read(min(m.size, NPY_HEADER_ROOM)))
        nbytes = math.prod(shape) * dtype.itemsize
        if m.size - skip < nbytes:
            raise ShardFormatError(f".npy payload truncated: {m.size - skip} bytes for shape {shape} {dtype}")
        if not fortran:
            return ArrayAt(path, m.offset_data + skip, dtype, shape)
        region = self.arena.region(m.ext, m.size)
        f.seek(m.offset_data)
        data = f.read(m.size) if region is None else region[:f.readinto(region[:m.size])]
        return npy_view(data)

    def copy_into(self, raw: RawSample, rows: dict[str, np.ndarray]) -> bool:
        """Copy ``raw``'s arrays into the batch rows ``rows['s1']``, ``rows['s2']`` (numpy views, the batch's dtypes).

        Arrays located in a local file are read straight into the row (``preadv``; through a scratch
        buffer when the batch holds another dtype, e.g. uint16 as int32). I/O errors are handled as
        in `segment`: transient ones (a network file system's timeouts) are retried for the retry
        window and then stop the run (`StorageUnavailable`), others are retried a few times with the
        file opened again. A read that still comes back short, or fails, loses the sample: counted,
        warned, False."""
        for name in ("s1", "s2"):
            src, dst = getattr(raw, name), rows[name]
            if not isinstance(src, ArrayAt):
                dst[...] = src
                continue
            direct = dst.dtype == src.dtype and dst.flags.c_contiguous
            target = dst if direct else self._scratch(name, src)
            reason = self._pread(raw, src, target)
            if reason is not None:
                self.skipped_samples += 1
                self.warn(f"lost sample {raw.key} of {raw.shard} (rank {self.spec.rank}): reading its {name} "
                          f"array {reason}")
                return False
            if not direct:
                dst[...] = target
        return True

    def _pread(self, raw: RawSample, src: "ArrayAt", target: np.ndarray) -> Optional[str]:
        """Read ``src`` into ``target``; None when it all arrived, else why not."""
        attempts, outage = 0, None
        while True:
            try:
                got = os.preadv(self._fd(src.path), [memoryview(target).cast("B")], src.offset)
            except OSError as err:
                self._forget(src.path)  # a fresh descriptor for the next attempt
                if is_transient(err):
                    outage = outage or time.monotonic()
                    self._wait_out(self._shard_info(raw.shard), err, outage, attempts)
                elif attempts >= MID_STREAM_RETRIES:
                    return f"failed: {type(err).__name__}: {err}"
                attempts += 1
                continue
            if outage is not None:
                self.warn(f"reading {raw.shard} again after {time.monotonic() - outage:.0f} s")
            if got != target.nbytes:
                return f"gave {got} of {target.nbytes} bytes: the file changed after it was checked"
            return None

    def _shard_info(self, name: str) -> ShardInfo:
        return next(s for s in self.spec.shards if s.name == name)

    def _forget(self, path: str) -> None:
        fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)

    def _scratch(self, name: str, at: "ArrayAt") -> np.ndarray:
        buf = self._scratches.get(name)
        if buf is None or buf.dtype != at.dtype or buf.shape != at.shape:
            buf = self._scratches[name] = np.empty(at.shape, at.dtype)
        return buf

    def _fd(self, path: str) -> int:
        """An open descriptor of a local shard, kept for the next reads (the shuffle buffer spans a few shards)."""
        fd = self._fds.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            while len(self._fds) >= OPEN_FILES:
                os.close(self._fds.pop(next(iter(self._fds))))
        self._fds[path] = fd  # most recently used last
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    # -- the local cache ------------------------------------------------------------------------

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
        problem = download_verified(fs, path, shard, dest, self.spec.block_size)
        if problem is not None:
            self.warn(f"not caching {redact_url(shard.url)}: {problem}")
        return problem is None


DOWNLOAD_STREAMS = 4
"""Ranged requests in flight while a shard is copied into the node cache, each a block (16 MiB: up to 5 blocks,
80 MiB, held with the one being written). One
connection to an object store carries ~50-100 MB/s, so a 512 MiB shard read block after block takes 5-10 s; S3's
guidance is parallel byte-range fetches of 8-16 MB ("Use Byte-Range Fetches"). bench/bench_cache_download.py."""


def download_verified(fs: Any, path: str, shard: ShardInfo, dest: str, block: int = DEFAULT_BLOCK_SIZE,
                      streams: int = DOWNLOAD_STREAMS) -> Optional[str]:
    """Copy ``path`` to ``dest`` if it is ``shard`` (its size, then the sha256 of what was read, against the
    manifest's), by ranged reads of ``block`` bytes, ``streams`` in flight, written and hashed in order; atomic:
    ``dest`` is the whole checked file or absent. None when done, else what did not match. Storage errors are
    raised (the caller retries the transient ones)."""
    size = fs.size(path)
    if size != shard.bytes:
        return f"{size} bytes, the manifest says {shard.bytes} bytes"
    tmp = f"{os.path.dirname(dest)}/.{shard.name}.{uuid.uuid4().hex}.tmp"
    sha, got = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as out:
            for chunk in _blocks_in_order(fs, path, size, block, streams):
                sha.update(chunk)
                out.write(chunk)
                got += len(chunk)
        if got != shard.bytes or sha.hexdigest() != shard.sha256:
            return (f"{got} bytes, sha256 {sha.hexdigest()[:12]}…, the manifest says {shard.bytes} bytes, "
                    f"{(shard.sha256 or '')[:12]}…")
        os.replace(tmp, dest)  # atomic: readers see the whole checked file or nothing
        return None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _blocks_in_order(fs: Any, path: str, size: int, block: int, streams: int) -> Iterator[bytes]:
    """The bytes of ``path`` up to ``size``, block by block in order, ``streams`` blocks fetched at once; a block the
    object ends early in is short (and the rest empty). A failed request is raised; requests not started yet are
    cancelled, those running end on their own (their threads are daemons of the pool, joined at exit)."""
    from concurrent.futures import ThreadPoolExecutor

    starts = iter(range(0, size, block))
    pool = ThreadPoolExecutor(max(1, streams), thread_name_prefix="cache-download")
    try:
        ahead = deque(pool.submit(read_range, fs, path, s, min(s + block, size)) for s in islice(starts, streams))
        while ahead:
            data = ahead.popleft().result()
            nxt = next(starts, None)
            if nxt is not None:
                ahead.append(pool.submit(read_range, fs, path, nxt, min(nxt + block, size)))
            yield data
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1
