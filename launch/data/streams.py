"""The streams a rank's DataLoader workers play: the training stream and the one-pass stream.

Each worker process runs one stream (k of K) of its rank: it reads its slots
through a `ShardReader`, draws crops and flips, and assembles batches with one
copy from the member bytes into shared memory. See `launch.data.plan` for which
slots a stream holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from launch.data import plan
from launch.data.augment import draw_crops, full_boxes
from launch.data.buffers import BatchPool
from launch.data.reader import RawSample, ReadSpec, ShardReader

log = logging.getLogger("launch.data.streams")

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


@dataclass(frozen=True)
class StreamSpec:
    """Everything a loader worker needs (pickled to worker processes; no open handles)."""

    read: ReadSpec
    world_size: int
    num_workers: int
    """Streams per rank (K, at least 1)."""
    micro_batch_size: int
    seed: int = 0
    shuffle_buffer: int = 256
    crop_scale_min: float = 0.35
    hflip: bool = True
    vflip: bool = True
    start_batch: int = 0
    """Rank batch the DataLoader's worker 0 produces first (resumption)."""
    origin_batches: int = 0
    origin_samples: int = 0
    """A layout change restarts the arithmetic at (origin_batches, global samples consumed)."""

    @property
    def rank(self) -> int:
        return self.read.rank

    @property
    def num_samples(self) -> int:
        return int(self.read.counts().sum())


class _Stream(IterableDataset):
    """The batches of one rank: in a DataLoader worker, the stream that worker plays; in-process, stream 0."""

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec
        self.released: Optional[torch.Tensor] = None
        """Set by the loader before its workers start: the `ReleaseTracker` array their batch pools read."""
        self.resend = True
        """Send the arrays with every batch (pinned batches; in-process); the loader clears it for its workers."""

    def _worker(self) -> int:
        """The stream this process plays: DataLoader worker j takes rank batches start + j, start + j + K, ..."""
        info = get_worker_info()
        if info is None:
            if self.spec.num_workers != 1:
                raise LoaderError("a stream plan with several streams must run in DataLoader workers")
            return 0
        if info.num_workers != self.spec.num_workers:
            raise LoaderError(f"DataLoader has {info.num_workers} workers, the stream plan {self.spec.num_workers}")
        return (self.spec.start_batch + info.id) % self.spec.num_workers

    def _pool(self) -> BatchPool:
        spec = self.spec.read
        shapes = {"s1": spec.s1_shape, "s2": spec.s2_shape} if spec.images else {}
        dtypes = {"s1": _TORCH_DTYPE[np.dtype(spec.s1_dtype)], "s2": _TORCH_DTYPE[np.dtype(spec.s2_dtype)]}
        return BatchPool(shapes, dtypes, self.spec.micro_batch_size, released=self.released)

    def _fill(self, reader: ShardReader, pool: BatchPool,
              items: Iterator[tuple[int, RawSample]]) -> Optional["_Filling"]:
        """Copy up to a micro batch of ``items`` into arrays from ``pool``, each sample as it arrives (its bytes in
        the reader's arena are written again later); None when ``items`` ended first."""
        spec = self.spec.read
        out: Optional[_Filling] = None
        for epoch, raw in items:
            if out is None:
                arrays, tag, new = pool.take(self.spec.micro_batch_size) if spec.images else ({}, None, True)
                out = _Filling(epoch, arrays, tag, new, {k: a.numpy() for k, a in arrays.items()})
            # the one copy: a local file's bytes (or the arena's) → the batch (in shared memory in workers)
            if spec.images and not reader.copy_into(raw, {k: a[len(out.raws)] for k, a in out.rows.items()}):
                continue
            out.raws.append(raw._replace(s1=None, s2=None))
            if len(out.raws) == self.spec.micro_batch_size:
                break
        if out is not None and not out.raws:  # every sample after the batch began was lost: no empty batch
            pool.cancel()
            return None
        return out

    def _batch(self, reader: ShardReader, k: int, index: int, out: "_Filling", crop: np.ndarray,
               flip: np.ndarray) -> dict[str, Any]:
        n = len(out.raws)
        batch: dict[str, Any] = {
            "keys": [raw.key for raw in out.raws],
            "crop": torch.from_numpy(crop),
            "flip": torch.from_numpy(flip),
            "epoch": out.epoch,
            "worker": k,
            "batch_index": index,
            "skipped_shards": reader.skipped_shards,
            "skipped_samples": reader.skipped_samples,
            "warnings": reader.pending_warnings,
            "buffer": None if out.tag is None else (*out.tag, n),
        }
        reader.pending_warnings = []
        if out.tag is None or out.new or self.resend:  # else the main process rebuilds them from the slot it holds
            batch.update((name, a if a.shape[0] == n else a[:n]) for name, a in out.arrays.items())
        if self.spec.read.with_meta:
            batch["meta"] = [raw.meta for raw in out.raws]
        return batch


@dataclass
class _Filling:
    """A batch being assembled: its first sample's epoch, its arrays (from a `BatchPool`), the samples so far."""

    epoch: int
    arrays: dict[str, torch.Tensor]
    tag: Optional[tuple[int, int, int]]
    new: bool
    """The pool's slot is new: its storage travels with the batch (later batches of the slot send the tag only)."""
    rows: dict[str, np.ndarray]
    """``arrays`` as numpy (the same memory)."""
    raws: list[RawSample] = field(default_factory=list)


class TrainStream(_Stream):
    """Infinite, shuffled, with crop boxes and flips drawn per batch."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        k = self._worker()
        spec = self.spec
        reader = ShardReader(spec.read, keep=max(1, spec.shuffle_buffer))
        K, mb = spec.num_workers, spec.micro_batch_size
        lo, hi = plan.stream_range(spec.num_samples, spec.rank, spec.world_size, k, K)
        length = hi - lo
        if length == 0:
            raise LoaderError(f"stream (rank {spec.rank}, worker {k}) has no samples: {spec.num_samples} samples "
                              f"for {spec.world_size} ranks x {K} workers")
        _, index = plan.stream_start(spec.start_batch, k, K)
        position = plan.resume_position(length, spec.num_samples, index, mb, k, K, spec.origin_batches,
                                        spec.origin_samples)
        samples = self._shuffled(reader, k, lo, length, position)
        pool = self._pool()
        try:
            while True:
                out = self._fill(reader, pool, samples)
                assert out is not None and len(out.raws) == mb  # the stream is infinite
                rng = np.random.default_rng([spec.seed, out.epoch, spec.rank, k, index, 1])
                crop, flip = draw_crops(rng, mb, spec.crop_scale_min, spec.hflip, spec.vflip, spec.read.s2_shape[1:])
                yield self._batch(reader, k, index, out, crop, flip)
                index += 1
        finally:  # the stream is closed (or collected): its open shard files with it
            reader.close()

    def _shuffled(self, reader: ShardReader, k: int, lo: int, length: int,
                  position: int) -> Iterator[tuple[int, RawSample]]:
        """(epoch, sample) from stream position ``position`` on, forever; reads at most one block to start."""
        spec = self.spec
        B = max(1, spec.shuffle_buffer)
        epoch, offset = divmod(position, length)
        while True:
            order = plan.shard_order(len(spec.read.shards), spec.seed, epoch)
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


class PassStream(_Stream):
    """One pass in manifest order, no augmentation (full boxes), positions reported."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        k = self._worker()
        spec = self.spec
        reader = ShardReader(spec.read, keep=1)
        lo, hi = plan.stream_range(spec.num_samples, spec.rank, spec.world_size, k, spec.num_workers)
        items = ((0, raw) for raw in reader.slots(np.arange(len(spec.read.shards)), lo, hi) if raw is not None)
        pool = self._pool()
        index = 0
        try:
            while (out := self._fill(reader, pool, items)) is not None:
                batch = self._batch(reader, k, index, out, *full_boxes(len(out.raws)))
                batch["positions"] = [(raw.shard, raw.offset) for raw in out.raws]
                yield batch
                index += 1
        finally:
            reader.close()
        for msg in reader.pending_warnings:  # no batch left to carry them: straight to the worker's stderr
            log.warning(msg)
