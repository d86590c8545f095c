"""The Ray side of a split: one task per shard, scheduled from the driver with a bounded number in flight.

A shard task streams its samples into a local tar and publishes it in one step (a
rename on a local output, one upload on an object store), then writes its progress
record: a record means the shard is complete, so a killed run loses at most the
shards that were in flight.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from pipeline.logs import drop_orphaned_connection_errors
from pipeline.job import STAGING_PREFIX, PreprocessSettings, SourceSpec, progress_path
from pipeline.plan import ShardTask, SplitPlan
from pipeline.signals import keep_sigterm_handler
from pipeline.shards import Sample, ShardWriter
from pipeline.sources import Rejection, Source
from pipeline.stats import BandMoments, HalfSums, IntegerSums
from pipeline.storage import RETRY_WINDOW_ENV, is_local, put_atomic, retry_window_s, url_to_fs, write_bytes_atomic


def init_ray(address: Optional[str], workers: int) -> None:
    """Connect to ``address`` (else $RAY_ADDRESS), or start an embedded instance with ``workers`` CPUs."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # The job's workers see the storage retry window this driver runs with (on a cluster they do not
    # inherit the driver's environment).
    runtime_env = {"env_vars": {RETRY_WINDOW_ENV: repr(retry_window_s())}}
    with keep_sigterm_handler():  # ray.init installs sys.exit for SIGTERM: the job's own stop stays in place
        _init(ray, address, workers, runtime_env)
    _CLUSTER["kind"] = "existing" if address else "embedded"


def _init(ray: Any, address: Optional[str], workers: int, runtime_env: dict[str, Any]) -> None:
    if address:  # an existing cluster (`ray submit` sets RAY_ADDRESS=auto through the cluster YAML)
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
    else:  # the embedded default: a local instance sized to --workers. address="local": a new one even when
        # a `ray start` cluster is up on this machine, which a bare ray.init() would find and try to join
        ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=True,
                 runtime_env=runtime_env)


_CLUSTER: dict[str, str] = {}


def ray_cluster() -> dict[str, Any]:
    """What this job ran on, for the manifest's ``run`` section: ``{"ray": "existing" | "embedded", "nodes",
    "cpus"}`` (the cluster's, as Ray reports them); empty before `init_ray`."""
    import ray

    if not ray.is_initialized() or "kind" not in _CLUSTER:
        return {}
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {"ray": _CLUSTER["kind"], "nodes": len(nodes), "cpus": int(ray.cluster_resources().get("CPU", 0))}


@dataclass
class _Tally:
    """What a shard task learns about its samples while writing them."""

    s1: BandMoments
    s2: BandMoments
    rejections: list[dict[str, Any]] = field(default_factory=list)
    dtypes: dict[str, str] = field(default_factory=dict)
    shape: Optional[list[int]] = None
    """[H, W] of the first sample."""

    s2_sums: Optional[IntegerSums] = None
    """Exact sums of integer S2 (valid = not the no-data value: `Source.valid_s2`), folded into ``s2`` at the end."""
    s1_counts: Optional[HalfSums] = None
    """Histograms of float16 S1 (valid = finite: `Source.valid_s1`), folded into ``s1`` at the end."""

    def add(self, sample: Sample, source: Source) -> None:
        finite_is_valid = type(source).valid_s1 is Source.valid_s1
        if finite_is_valid and HalfSums.supports(sample.s1):
            if self.s1_counts is None:
                self.s1_counts = HalfSums(sample.s1.shape[0])
            self.s1_counts.add(sample.s1)
        elif finite_is_valid and np.issubdtype(sample.s1.dtype, np.floating):
            self.s1 = self.s1.merge(BandMoments.of_finite(sample.s1))  # valid = finite, read from the float64 copy
        else:
            self.s1 = self.s1.merge(BandMoments.of(sample.s1, source.valid_s1(sample.s1)))
        if IntegerSums.supports(sample.s2):
            if self.s2_sums is None:
                self.s2_sums = IntegerSums(sample.s2.shape[0], source.nodata()["s2"])
            self.s2_sums.add(sample.s2)
        else:
            self.s2 = self.s2.merge(BandMoments.of(sample.s2, source.valid_s2(sample.s2)))
        self.dtypes.setdefault("s1", str(sample.s1.dtype))
        self.dtypes.setdefault("s2", str(sample.s2.dtype))
        self.shape = self.shape or list(sample.s2.shape[1:])

    def s1_moments(self) -> BandMoments:
        return self.s1 if self.s1_counts is None else self.s1.merge(self.s1_counts.moments())

    def s2_moments(self) -> BandMoments:
        return self.s2 if self.s2_sums is None else self.s2.merge(self.s2_sums.moments())


def one_thread_per_worker() -> None:
    """Keep the codecs a shard task calls on its own thread. The job runs one worker per core, and numcodecs'
    Blosc (which decodes the Zarr sources' chunks) starts a thread per core (up to 8) when called from a process's
    main thread, where Ray runs a task: N workers would run up to 8N decoding threads. Importing zarr turns those
    threads off, but the direct readers (`pipeline.sources.zarr_v2`) may never import it. Single-threaded it also
    measured ~6% faster on an idle 2-core machine (a 7 MB chunk of LZ4 is not worth splitting)."""
    from numcodecs import blosc

    blosc.use_threads = False


def build_shard(spec: SourceSpec, split: str, task: ShardTask, out_url: str,
                storage_options: dict[str, Any]) -> dict[str, Any]:
    """Read the items of ``task``, write its shard under ``out_url``, return its record (stats, rejections).

    The returned record also holds ``task_seconds``, how long this call took; the progress record written
    beside the shard does not (it is part of the job's deterministic output)."""
    started = time.perf_counter()
    drop_orphaned_connection_errors()  # Ray workers do not run the driver's logging setup
    one_thread_per_worker()
    source = spec.build()
    fs, root = url_to_fs(out_url, storage_options)
    tally = _Tally(BandMoments.zeros(len(source.s1_bands)), BandMoments.zeros(len(source.s2_bands)))
    # A local output gets the tar written beside its final name and renamed (one write, atomic);
    # an object store gets it staged on the worker's disk and uploaded (`put_atomic`: in 8 MiB parts on S3).
    tmp = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=root if is_local(fs) else None)
    try:
        local = os.path.join(tmp, task.name)
        with ShardWriter(local) as writer:
            for result in source.read(task.work_items(), split):
                if isinstance(result, Rejection):
                    tally.rejections.append(result.to_dict())
                    continue
                writer.write(result)
                tally.add(result, source)
        if writer.samples:
            if is_local(fs):
                os.replace(local, f"{root}/{task.name}")
            else:
                put_atomic(fs, local, f"{root}/{task.name}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record = {
        "fingerprint": task.fingerprint,
        "index": task.index,
        "name": task.name,
        "samples": writer.samples,
        "bytes": writer.bytes if writer.samples else 0,
        "sha256": writer.sha256 if writer.samples else None,
        "keys": sorted(writer.keys),
        "rows": writer.rows,  # (key, offset, label_vector) in write order: the sample index (pipeline.index)
        "dtypes": tally.dtypes,
        "shape": tally.shape,
        "stats": {"s1": tally.s1_moments().to_dict(), "s2": tally.s2_moments().to_dict()},
        "rejections": tally.rejections,
    }
    # The record is written after the shard is published: its presence means the shard is complete. Not
    # fsynced: a rerun reuses a shard only when its record parses and its size (and sha256) check out, so a
    # record or shard a power cut tore or lost is rebuilt.
    write_bytes_atomic(fs, progress_path(root, task.name), json.dumps(record, sort_keys=True).encode(),
                       durable=False)
    return {**record, "task_seconds": time.perf_counter() - started}


@dataclass
class ShardPhase:
    """How this run's shard tasks went; the manifest's ``run`` section records it (`as_run`)."""

    started: float = field(default_factory=time.time)
    seconds: float = 0.0
    """Wall clock from the first task's submission to the last one's result."""
    shards: int = 0
    """Shards built by this run (not those reused from an earlier one)."""
    samples: int = 0
    task_seconds: float = 0.0
    """The shard tasks' own durations, summed: worker time spent reading, checking and writing, without
    planning, scheduling and the commit. ``samples / task_seconds`` is one busy worker's throughput."""

    def as_run(self) -> dict[str, Any]:
        return {"shard_seconds": round(self.seconds, 3), "shards_built": self.shards,
                "samples_built": self.samples, "task_seconds": round(self.task_seconds, 3)}

    def summary(self, split: str) -> str:
        rate = f"{self.samples / self.task_seconds:.1f}" if self.task_seconds > 0 else "-"
        return (f"[{split}] built {self.shards} shards ({self.samples} samples) in {self.seconds:.1f}s; "
                f"{self.task_seconds:.1f}s in shard tasks, {rate} samples/s per busy worker")


def run_shards(settings: PreprocessSettings, spec: SourceSpec, plan: SplitPlan,
               out_url: str) -> tuple[dict[int, dict[str, Any]], ShardPhase]:
    """Build the shards the plan still needs, at most ``settings.workers`` at once; every record by shard index,
    and how the shard tasks of this run went."""
    import ray
    from tqdm import tqdm

    phase = ShardPhase()
    records = dict(plan.reused)
    remote = ray.remote(num_cpus=1, max_retries=3)(build_shard)
    bar = tqdm(total=len(plan.tasks), initial=len(records), desc=f"{plan.split} shards", unit="shard",
               disable=not settings.progress, dynamic_ncols=True)
    pending: dict[Any, int] = {}
    queue = plan.todo
    written = sum(r["samples"] for r in records.values())
    quarantined = len(plan.rejections) + sum(len(r["rejections"]) for r in records.values())
    while queue or pending:
        while queue and len(pending) < settings.workers:
            task = queue.pop(0)
            ref = remote.remote(spec, plan.split, task, out_url, settings.storage_options)
            pending[ref] = task.index
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            index = pending.pop(ref)
            rec = ray.get(ref)
            phase.task_seconds += rec.pop("task_seconds")
            phase.shards += 1
            phase.samples += rec["samples"]
            records[index] = rec
            written += rec["samples"]
            quarantined += len(rec["rejections"])
            bar.update(1)
            bar.set_postfix(samples=written, quarantined=quarantined)
    bar.close()
    phase.seconds = time.time() - phase.started
    if phase.shards:
        print(phase.summary(plan.split))
    return records, phase
