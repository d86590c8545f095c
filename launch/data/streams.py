"""The streams a rank's DataLoader workers play: the training stream and the one-pass stream.

Each worker process runs one stream (k of K) of its rank: it reads its slots
through a `ShardReader`, draws crops and flips, and assembles batches with one
copy from the member bytes into shared memory. See `launch.data.plan` for which
slots a stream holds.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from launch.data import plan
from launch.data.augment import draw_crops, full_boxes
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

    def _batch(self, reader: ShardReader, k: int, index: int, items: list[tuple[int, RawSample]],
               crop: np.ndarray, flip: np.ndarray) -> dict[str, Any]:
        spec = self.spec.read
        batch: dict[str, Any] = {
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
        if spec.images:
            n = len(items)
            s1 = _new_tensor((n, *spec.s1_shape), _TORCH_DTYPE[np.dtype(spec.s1_dtype)])
            s2 = _new_tensor((n, *spec.s2_shape), _TORCH_DTYPE[np.dtype(spec.s2_dtype)])
            s1_np, s2_np = s1.numpy(), s2.numpy()
            for i, (_, raw) in enumerate(items):  # the one copy: member bytes → batch (in shared memory in workers)
                s1_np[i] = raw.s1
                s2_np[i] = raw.s2
            batch.update(s1=s1, s2=s2)
        if spec.with_meta:
            batch["meta"] = [raw.meta for _, raw in items]
        return batch


class TrainStream(_Stream):
    """Infinite, shuffled, with crop boxes and flips drawn per batch."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        k = self._worker()
        reader = ShardReader(self.spec.read)
        spec = self.spec
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
        while True:
            items = [next(samples) for _ in range(mb)]
            rng = np.random.default_rng([spec.seed, items[0][0], spec.rank, k, index, 1])
            crop, flip = draw_crops(rng, mb, spec.crop_scale_min, spec.hflip, spec.vflip, spec.read.s2_shape[1:])
            yield self._batch(reader, k, index, items, crop, flip)
            index += 1

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
        reader = ShardReader(self.spec.read)
        spec = self.spec
        lo, hi = plan.stream_range(spec.num_samples, spec.rank, spec.world_size, k, spec.num_workers)
        items: list[tuple[int, RawSample]] = []
        index = 0
        for raw in reader.slots(np.arange(len(spec.read.shards)), lo, hi):
            if raw is not None:
                items.append((0, raw))
            if len(items) == spec.micro_batch_size:
                yield self._pass_batch(reader, k, index, items)
                items, index = [], index + 1
        if items:
            yield self._pass_batch(reader, k, index, items)
        for msg in reader.pending_warnings:  # no batch left to carry them: straight to the worker's stderr
            log.warning(msg)

    def _pass_batch(self, reader: ShardReader, k: int, index: int, items: list[tuple[int, RawSample]]) -> dict:
        batch = self._batch(reader, k, index, items, *full_boxes(len(items)))
        batch["positions"] = [(raw.shard, raw.offset) for _, raw in items]
        return batch


def _new_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a worker, directly in shared memory so the hand-over copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device=proto.device)
    return proto.new(storage).resize_(shape)
