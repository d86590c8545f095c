"""Planning one split on the driver: list the archive, cut it into shards, find what an earlier run finished.

The plan depends only on the archive and the content settings, never on the number of
workers or on what happened before: the same inputs give the same shards, names and
fingerprints, which is what makes a rerun byte-identical and a killed run resumable.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from pipeline.inventory import ChunkPart, PlannedItems, as_planned, shard_fingerprint, work_items
from pipeline.job import PreprocessError, PreprocessSettings, fingerprint, progress_path
from pipeline.shards import SHARD_NAME
from pipeline.sources import Rejection, Source, WorkItem
from pipeline.storage import read_bytes, redact_url, retrying, sha256_remote, url_to_fs

MapFn = Callable[[Callable, Sequence], list]


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: its place in the set and the items it holds, in order."""

    index: int
    name: str
    items: Sequence[Union[WorkItem, ChunkPart]]
    """Items planned on the driver as they are; those an inventory task left in Ray's object store as `ChunkPart`s,
    which the shard task fetches (`work_items`)."""
    fingerprint: str
    """sha256 of the job fingerprint and the items' keys and references: a progress record carrying it is this shard."""

    def work_items(self) -> list[WorkItem]:
        return work_items(self.items)


@dataclass(frozen=True)
class SplitPlan:
    """What the driver decided for one split before any pixel is read."""

    split: str
    content: dict[str, Any]
    """`PreprocessSettings.content` of the split (recorded in the manifest)."""
    job_fingerprint: str
    items: PlannedItems
    """The samples to read, in their deterministic order (mostly in Ray's object store: `pipeline.inventory`)."""
    rejections: list[Rejection]
    """Inputs rejected while listing (unpaired or unreadable files)."""
    tasks: list[ShardTask]
    """Every shard of the set, in index order."""
    reused: dict[int, dict[str, Any]]
    """Progress records of shards an earlier run of the same plan completed, by shard index."""
    started: float
    """time.time() when planning began (the manifest's run.seconds counts from it)."""
    planned: Optional[float] = None
    """time.time() when planning ended."""

    @property
    def todo(self) -> list[ShardTask]:
        return [t for t in self.tasks if t.index not in self.reused]

    @property
    def input_samples(self) -> int:
        return len(self.items) + len(self.rejections)


def shard_bounds(est_bytes: Sequence[int], shard_bytes: int, max_samples: int) -> list[tuple[int, int]]:
    """Cut items of these estimated sizes, in order, into ranges [lo, hi) of at most ``shard_bytes`` and
    ``max_samples`` (a single item larger than ``shard_bytes`` is a shard of its own).

    Depends only on the sizes, so the shard layout is the same whatever the number of workers."""
    bounds: list[tuple[int, int]] = []
    lo, size = 0, 0
    for i, est in enumerate(int(e) for e in est_bytes):
        if i > lo and (size + est > shard_bytes or i - lo >= max_samples):
            bounds.append((lo, i))
            lo, size = i, 0
        size += est
    if len(est_bytes) > lo:
        bounds.append((lo, len(est_bytes)))
    return bounds


def pack_shards(items: Sequence[WorkItem], shard_bytes: int, max_samples: int) -> list[list[WorkItem]]:
    """The ordered items cut as `shard_bounds` cuts them."""
    items = list(items)
    return [items[lo:hi] for lo, hi in shard_bounds([it.est_bytes for it in items], shard_bytes, max_samples)]


def shard_tasks(job_fp: str, split: str, items: PlannedItems, shard_bytes: int, max_samples: int) -> list[ShardTask]:
    """Cut ``items`` into shards, name them and fingerprint them from the items' digests (no item is fetched)."""
    digests = items.digests()
    return [ShardTask(index, SHARD_NAME.format(split=split, index=index), items.parts(lo, hi),
                      shard_fingerprint(job_fp, digests[lo:hi]))
            for index, (lo, hi) in enumerate(shard_bounds(items.est_bytes(), shard_bytes, max_samples))]


def plan_split(settings: PreprocessSettings, source: Source, split: str, out_url: str, map_fn: MapFn) -> SplitPlan:
    """List ``split`` (``map_fn`` runs inventory work in parallel), pack it and find reusable shards in ``out_url``."""
    content = settings.content(split)
    job_fp = fingerprint(content)
    t0 = time.time()
    listed, rejections = source.plan(split, map_fn)
    items = as_planned(listed)
    if not len(items) and not rejections:
        raise PreprocessError(f"{redact_url(settings.input)}: no samples found for split {split!r}")
    tasks = shard_tasks(job_fp, split, items, settings.shard_bytes, settings.samples_per_shard)
    print(f"[{split}] planned {len(items)} samples in {len(tasks)} shards "
          f"({len(rejections)} rejected while listing) in {time.time() - t0:.1f}s; the driver keeps "
          f"{items.driver_bytes() / 1e6:.1f} MB of it (summaries; {items.remote_samples()} samples' items "
          "in Ray's object store)")
    fs, root = url_to_fs(out_url, settings.storage_options)
    reused = {}
    for task in tasks:
        record = reusable_record(fs, root, task, settings.verify_existing)
        if record is not None:
            reused[task.index] = record
    if reused:
        print(f"[{split}] reusing {len(reused)} shards completed by an earlier run")
    return SplitPlan(split, content, job_fp, items, rejections, tasks, reused, t0, time.time())


def reusable_record(fs, root: str, task: ShardTask, verify: str) -> Optional[dict[str, Any]]:
    """The progress record of ``task`` left by an earlier run with the same plan, if its tar checks out.

    ``verify``: 'sha256' re-hashes the tar, 'size' compares its length only."""
    try:
        record = json.loads(read_bytes(fs, progress_path(root, task.name)))
    except (FileNotFoundError, ValueError):
        return None
    if record.get("fingerprint") != task.fingerprint:
        return None
    if record["samples"] == 0:
        return record
    tar = f"{root}/{task.name}"
    try:
        if retrying(fs.size)(tar) != record["bytes"]:
            return None
        if verify == "sha256" and sha256_remote(fs, tar) != record["sha256"]:
            return None
    except FileNotFoundError:
        return None
    return record
