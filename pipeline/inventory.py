"""The planned samples of a split, kept where they were made: the driver holds a summary, not the samples.

An archive of a million samples plans into a million `WorkItem`s (about 2 KB each as Python
objects: a dict of references, a dict of metadata, product names, timestamps). The inventory
tasks that read the archive's files on the cluster (`ray_inventory`) leave their items in
Ray's object store and send the driver a `Summary` only: per sample, its estimated size in
a shard (4 bytes), a digest of its key and references (16 bytes, what a shard's
fingerprint is made of) and a hash of its key (8 bytes, for the duplicate-key check), and
its index among the chunk's kept items (4 bytes): 32 bytes, about 32 MB for SSL4EO-S12
v1.1's 985k samples, where the items themselves take about 1.5 KB each as Python objects
(`bench/bench_planning.py`). Shard tasks fetch their items from
the object store themselves (`ShardTask.work_items`). Every source plans this way: the
Zarr and WebDataset releases one task per file pair, the GeoTIFF trees one task per group
of folders (`pipeline.sources.listing`).

`PlannedItems` is the sequence a source's ``plan`` returns: chunks in plan order, each a
list or an object-store reference with its summary, and which of its items are kept (a
duplicate key is dropped after the fact). Indexing or iterating it fetches chunks; the
planning itself never does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence, Union

import numpy as np

if TYPE_CHECKING:  # the sources import this module: no import of them at run time
    from pipeline.sources.base import Rejection, WorkItem

DIGEST_BYTES = 16


def item_digest(item: WorkItem) -> bytes:
    """What a shard's fingerprint takes from one item: a digest of its key and its references (canonical JSON)."""
    return hashlib.sha256(json.dumps([item.key, item.refs], sort_keys=True, default=str).encode()).digest()[:DIGEST_BYTES]


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class Summary:
    """What the driver keeps of a chunk's items: per item, size estimate, digest and key hash."""

    est_bytes: np.ndarray
    """(n,) int32 (a sample is megabytes, never 2 GiB)."""
    digests: np.ndarray
    """(n, DIGEST_BYTES) uint8."""
    key_hashes: np.ndarray
    """(n,) uint64."""

    @classmethod
    def of(cls, items: Sequence[WorkItem]) -> "Summary":
        digests = np.frombuffer(b"".join(item_digest(it) for it in items), dtype=np.uint8)
        return cls(np.array([it.est_bytes for it in items], dtype=np.int32),
                   digests.reshape(len(items), DIGEST_BYTES),
                   np.array([key_hash(it.key) for it in items], dtype=np.uint64))

    def __len__(self) -> int:
        return len(self.est_bytes)


class Chunk:
    """The items of one inventory job: a list here, or a reference into Ray's object store; and which are kept."""

    def __init__(self, items: Union[list[WorkItem], Any], summary: Summary):
        self._items = items
        self.summary = summary
        self.keep = np.arange(len(summary), dtype=np.int32)
        """Indices of the items still planned, in order."""

    @property
    def remote(self) -> bool:
        return not isinstance(self._items, list)

    def fetch(self) -> list[WorkItem]:
        """All the chunk's items (kept or not), fetched from the object store when remote."""
        if not self.remote:
            return self._items
        import ray

        return ray.get(self._items)

    def part(self, lo: int, hi: int) -> Union[list[WorkItem], "ChunkPart"]:
        """Kept items [lo, hi) (positions among the kept ones): a list when local, else a `ChunkPart` to fetch later."""
        indices = self.keep[lo:hi]
        if not self.remote:
            return [self._items[i] for i in indices]
        return ChunkPart(self._items, tuple(int(i) for i in indices), self.summary.digests[indices].tobytes())


@dataclass(frozen=True)
class ChunkPart:
    """Some items of a chunk in the object store, as a shard task receives them."""

    ref: Any
    indices: tuple[int, ...]
    digests: bytes
    """The planned items' digests: what the shard's fingerprint was made of."""

    def fetch(self) -> list[WorkItem]:
        """The items, checked against their digests: Ray re-runs an inventory task whose node was lost, and a
        rerun that listed other items must stop the shard, not write other samples under its fingerprint."""
        import ray

        items = ray.get(self.ref)
        picked = [items[i] for i in self.indices]
        if b"".join(item_digest(it) for it in picked) != self.digests:
            raise RuntimeError("the planned samples of a shard changed after planning (an inventory task ran again "
                               "and listed other items); run the job again")
        return picked


class PlannedItems(Sequence):
    """A split's planned samples in plan order, as chunks (see the module docstring)."""

    def __init__(self, chunks: Sequence[Union[Chunk, list[WorkItem]]] = ()):
        self.chunks: list[Chunk] = []
        for c in chunks:
            self.add(c)

    def add(self, items: Union[Chunk, Sequence[WorkItem]]) -> None:
        """Append an inventory job's items: a `Chunk` (from `ray_inventory`) or a list (summarised here)."""
        if isinstance(items, PlannedItems):
            self.chunks.extend(items.chunks)
        elif isinstance(items, Chunk):
            self.chunks.append(items)
        elif len(items):
            items = list(items)
            self.chunks.append(Chunk(items, Summary.of(items)))

    def __len__(self) -> int:
        return sum(len(c.keep) for c in self.chunks)

    def __iter__(self) -> Iterator[WorkItem]:
        for c in self.chunks:
            items = c.fetch()
            for i in c.keep:
                yield items[i]

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(index)
        for c in self.chunks:
            if index < len(c.keep):
                return c.fetch()[c.keep[index]]
            index -= len(c.keep)
        raise IndexError(index)  # pragma: no cover - the bounds were checked above

    def _kept(self, field: str) -> np.ndarray:
        parts = [getattr(c.summary, field)[c.keep] for c in self.chunks]
        return np.concatenate(parts) if parts else getattr(Summary.of([]), field)

    def est_bytes(self) -> np.ndarray:
        return self._kept("est_bytes")

    def digests(self) -> np.ndarray:
        return self._kept("digests")

    def key_hashes(self) -> np.ndarray:
        return self._kept("key_hashes")

    def driver_bytes(self) -> int:
        """Bytes of the summaries held here (local chunks' items come on top: they were listed here)."""
        return sum(c.summary.est_bytes.nbytes + c.summary.digests.nbytes + c.summary.key_hashes.nbytes
                   + c.keep.nbytes for c in self.chunks)

    def remote_samples(self) -> int:
        return sum(len(c.keep) for c in self.chunks if c.remote)

    def drop(self, positions: Sequence[int]) -> None:
        """Drop the items at ``positions`` (among the kept ones, in plan order)."""
        gone = set(int(p) for p in positions)
        start = 0
        for c in self.chunks:
            n = len(c.keep)
            mine = [p - start for p in gone if start <= p < start + n]
            if mine:
                c.keep = np.delete(c.keep, mine)
            start += n

    def parts(self, lo: int, hi: int) -> list[Union[WorkItem, ChunkPart]]:
        """Kept items [lo, hi): local items as they are, remote ones as one `ChunkPart` per chunk."""
        out: list[Union[WorkItem, ChunkPart]] = []
        start = 0
        for c in self.chunks:
            n = len(c.keep)
            a, b = max(lo, start), min(hi, start + n)
            if a < b:
                part = c.part(a - start, b - start)
                out.extend(part) if isinstance(part, list) else out.append(part)
            start += n
            if start >= hi:
                break
        return out

    def duplicates(self) -> list[tuple[int, WorkItem]]:
        """(position, item) of every item whose key an earlier item has (exact: a hash match is checked on the keys;
        only chunks holding a candidate are fetched)."""
        hashes = self.key_hashes()
        order = np.argsort(hashes, kind="stable")  # equal hashes stay in plan order
        ordered = hashes[order]
        same = np.flatnonzero(ordered[1:] == ordered[:-1])
        if len(same) == 0:
            return []
        groups: dict[int, list[int]] = {}
        for j in same:
            groups.setdefault(int(ordered[j]), [int(order[j])]).append(int(order[j + 1]))
        found = []
        for positions in groups.values():
            seen: set[str] = set()
            for p in sorted(set(positions)):
                item = self[p]
                if item.key in seen:
                    found.append((p, item))
                seen.add(item.key)
        return sorted(found, key=lambda x: x[0])


def gathered(results: Iterable[tuple[Any, list[Rejection]]],
             rejections: Sequence[Rejection] = ()) -> tuple[PlannedItems, list[Rejection]]:
    """The inventory jobs' results (what ``map_fn`` returns: per job, its items and rejections) as one plan, in
    job order, after ``rejections`` found before the jobs ran."""
    items = PlannedItems()
    rejects = list(rejections)
    for its, rej in results:
        items.add(its)
        rejects.extend(rej)
    return items, rejects


def as_planned(items: Union[PlannedItems, Sequence[WorkItem]]) -> PlannedItems:
    return items if isinstance(items, PlannedItems) else PlannedItems([list(items)])


# -- the inventory map on Ray --------------------------------------------------------------------


InventoryFn = Callable[[Any], "tuple[list[WorkItem], list[Rejection]]"]


def ray_inventory(fn: InventoryFn, args: Iterable[Any]) -> list[tuple[Chunk, list[Rejection]]]:
    """Run the inventory ``fn`` over ``args`` as Ray tasks: per arg, its items as a `Chunk` left in the object
    store (the driver receives its `Summary`) and its rejections, in order. ``args`` may be a generator: each
    arg is submitted (and put in the object store) as it is made, so the driver never holds them all."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=2, num_returns=3)(_inventory)
    refs = [task.remote(fn, a) for a in args]
    summaries = ray.get([r[0] for r in refs])
    rejections = ray.get([r[2] for r in refs])
    return [(Chunk(r[1], s), rej) for r, s, rej in zip(refs, summaries, rejections)]


def _inventory(fn: InventoryFn, arg: Any) -> tuple[Summary, list[WorkItem], list[Rejection]]:
    from pipeline.logs import drop_orphaned_connection_errors

    drop_orphaned_connection_errors()  # Ray workers do not run the driver's logging setup
    items, rejections = fn(arg)
    return Summary.of(items), items, rejections


def serial_inventory(fn: InventoryFn, args: Iterable[Any]) -> list[tuple[list[WorkItem], list[Rejection]]]:
    """The same in this process (tests, benchmarks): items as lists."""
    return [fn(a) for a in args]


def shard_fingerprint(job_fp: str, digests: np.ndarray) -> str:
    """A shard's identity: the job's fingerprint and its items' digests, in order."""
    return hashlib.sha256(job_fp.encode() + np.ascontiguousarray(digests).tobytes()).hexdigest()


def work_items(parts: Sequence[Union[WorkItem, ChunkPart]]) -> list[WorkItem]:
    """A shard task's items: its local items as they are, its object-store parts fetched."""
    out: list[WorkItem] = []
    for p in parts:
        if isinstance(p, ChunkPart):
            out.extend(p.fetch())
        else:
            out.append(p)
    return out
