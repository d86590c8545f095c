"""Where every sample goes: pure placement arithmetic, no I/O.

Notation: N slots (samples) in the shard set, W ranks, rank r, K streams per rank
(K loader workers, or one stream in-process), mb samples per micro batch.

1. Epoch e orders the shards by ``default_rng([seed, e]).permutation``; the
   shards in that order, with their sample counts, give N *slots* (shard, index
   in shard).
2. The slots are cut into W contiguous rank ranges and each rank range into K
   contiguous stream ranges (``np.array_split`` sizes, the same every epoch).
3. A training stream is the concatenation of its epoch-0, epoch-1, ... ranges:
   infinite, so every rank always has a next batch and batches straddle epochs.
4. Each epoch range is cut into blocks of ``shuffle_buffer`` slots, a block is
   emitted in the order ``default_rng([seed, e, r, k, block])``.
5. The DataLoader takes batches from its K workers round-robin, so rank batch b
   is stream ``b % K``'s batch ``b // K``; the position is just the number of
   batches consumed.
"""

from __future__ import annotations

import numpy as np


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


def stream_start(start_batch: int, worker: int, num_workers: int) -> tuple[int, int]:
    """(first rank batch, its index in the stream) of stream ``worker`` when the rank resumes at ``start_batch``."""
    first = start_batch + (worker - start_batch) % num_workers
    return first, stream_batches_before(first, worker, num_workers)


def resume_position(length: int, num_samples: int, index: int, micro_batch_size: int, worker: int,
                    num_workers: int, origin_batches: int, origin_samples: int) -> int:
    """Position in a stream's infinite sample sequence (``length`` slots an epoch) before its batch ``index``.

    A layout change (other world size, workers, batch) restarts the arithmetic at ``origin_batches``
    rank batches / ``origin_samples`` global samples: the stream starts at the same epoch and the
    same fraction of its range as the global sample stream."""
    epoch0, offset0 = divmod(origin_samples, num_samples)
    position = epoch0 * length + offset0 * length // num_samples
    return position + (index - stream_batches_before(origin_batches, worker, num_workers)) * micro_batch_size


def slot_starts(counts: np.ndarray, order: np.ndarray) -> np.ndarray:
    """First slot of each shard of ``order`` (len(order) + 1,), from the per-shard sample ``counts``."""
    return np.concatenate([[0], np.cumsum(counts[order])])
