"""Turn a Sentinel-1/Sentinel-2 archive into WebDataset shards, on Ray.

Locally (starts an embedded Ray instance)::

    python -m pipeline.preprocess --source ssl4eo-zarr --input ./ssl4eo --output ./shards

On a cluster (``ray submit`` uploads only this file; the cluster YAML installs
the project on every node)::

    ray submit launch/ray/cluster.yaml pipeline/preprocess.py -- \\
        --source ssl4eo-zarr --input s3://bucket/ssl4eo-s12 --output s3://bucket/shards

The job is planned on the driver (listing, Zarr metadata), cut into shards
deterministically, and each shard is built by one Ray task that streams its
samples into a local tar and publishes it atomically. A small progress record
per shard makes a killed run resumable; ``manifest.json``, written last, is the
commit point.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a plain script (ray submit): make the package importable
    try:
        import pipeline  # noqa: F401  (installed on the node)
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from pipeline import __version__
from pipeline.shards import SHARD_NAME, ShardWriter
from pipeline.sources import SOURCES, Rejection, Source, SourceOptions, WorkItem
from pipeline.stats import BandMoments
from pipeline.storage import (
    check_writable,
    is_local,
    join,
    put_atomic,
    read_bytes,
    redact,
    redact_argv,
    redact_url,
    retrying,
    sha256_remote,
    url_to_fs,
    write_bytes_atomic,
)

log = logging.getLogger("pipeline.preprocess")
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.jsonl"
PROGRESS_DIR = "_progress"


class PreprocessError(Exception):
    """A problem with the invocation or the input that stops the job before it writes anything."""


@dataclass(frozen=True)
class SourceSpec:
    """Everything a worker needs to rebuild the source (it travels to Ray workers)."""

    name: str
    input_url: str
    options: SourceOptions

    def build(self) -> Source:
        return SOURCES[self.name](self.input_url, self.options)


# -- planning ------------------------------------------------------------------------------


def pack_shards(items: Sequence[WorkItem], shard_bytes: int, max_samples: int) -> list[list[WorkItem]]:
    """Cut the ordered items into shards of at most ``shard_bytes`` (estimated) and ``max_samples``.

    Depends only on the items, so the shard layout is the same whatever the number of workers.
    """
    shards: list[list[WorkItem]] = []
    cur: list[WorkItem] = []
    size = 0
    for it in items:
        if cur and (size + it.est_bytes > shard_bytes or len(cur) >= max_samples):
            shards.append(cur)
            cur, size = [], 0
        cur.append(it)
        size += it.est_bytes
    if cur:
        shards.append(cur)
    return shards


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# -- work on Ray workers -------------------------------------------------------------------


def build_shard(spec: SourceSpec, split: str, index: int, items: list[WorkItem], out_url: str,
                shard_fp: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """Read ``items``, write shard ``index`` under ``out_url``, return its record (stats, rejections)."""
    source = spec.build()
    fs, root = url_to_fs(out_url, storage_options)
    name = SHARD_NAME.format(split=split, index=index)
    m1 = BandMoments.zeros(len(source.s1_bands))
    m2 = BandMoments.zeros(len(source.s2_bands))
    rejections: list[dict[str, Any]] = []
    dtypes: dict[str, str] = {}
    shape: Optional[list[int]] = None
    # A local output gets the tar written beside its final name and renamed (one write, atomic);
    # an object store gets it staged on the worker's disk and uploaded in one PUT.
    tmp = tempfile.mkdtemp(prefix=".fusmae-shard-", dir=root if is_local(fs) else None)
    try:
        local = os.path.join(tmp, name)
        with ShardWriter(local) as writer:
            for result in source.read(items, split):
                if isinstance(result, Rejection):
                    rejections.append(result.to_dict())
                    continue
                writer.write(result)
                m1 = m1.merge(BandMoments.of(result.s1, source.valid_s1(result.s1)))
                m2 = m2.merge(BandMoments.of(result.s2, source.valid_s2(result.s2)))
                dtypes.setdefault("s1", str(result.s1.dtype))
                dtypes.setdefault("s2", str(result.s2.dtype))
                shape = shape or list(result.s2.shape[1:])
        if writer.samples:
            if is_local(fs):
                os.replace(local, f"{root}/{name}")
            else:
                put_atomic(fs, local, f"{root}/{name}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record = {
        "fingerprint": shard_fp,
        "index": index,
        "name": name,
        "samples": writer.samples,
        "bytes": writer.bytes if writer.samples else 0,
        "sha256": writer.sha256 if writer.samples else None,
        "keys": sorted(writer.keys),
        "dtypes": dtypes,
        "shape": shape,
        "stats": {"s1": m1.to_dict(), "s2": m2.to_dict()},
        "rejections": rejections,
    }
    # The record is written after the shard is published: its presence means the shard is complete.
    write_bytes_atomic(fs, f"{root}/{PROGRESS_DIR}/{name}.json", json.dumps(record, sort_keys=True).encode())
    return record


def _reusable(fs, root: str, shard_fp: str, name: str, verify: str) -> Optional[dict[str, Any]]:
    """The progress record of a shard finished by an earlier run with the same plan, if its tar checks out."""
    path = f"{root}/{PROGRESS_DIR}/{name}.json"
    try:
        record = json.loads(read_bytes(fs, path))
    except (FileNotFoundError, ValueError):
        return None
    if record.get("fingerprint") != shard_fp:
        return None
    if record["samples"] == 0:
        return record
    tar = f"{root}/{name}"
    try:
        if fs.size(tar) != record["bytes"]:
            return None
        if verify == "sha256" and sha256_remote(fs, tar) != record["sha256"]:
            return None
    except FileNotFoundError:
        return None
    return record


# -- the driver ----------------------------------------------------------------------------


def _init_ray(address: Optional[str], workers: int) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:  # an existing cluster (`ray submit` sets RAY_ADDRESS=auto through the cluster YAML)
        ray.init(address=address, log_to_driver=True)
    else:  # the embedded default: a local instance sized to --workers
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=True)


def _ray_map(fn: Callable, args: Sequence) -> list:
    """Run ``fn`` over ``args`` as Ray tasks, results in order."""
    import ray

    if not args:
        return []
    task = ray.remote(num_cpus=1, max_retries=2)(_apply)
    return ray.get([task.remote(fn, a) for a in args])


def _apply(fn: Callable, arg: Any) -> Any:
    return fn(arg)


def _content_args(args: argparse.Namespace, split: str) -> dict[str, Any]:
    """The settings that determine the shards' content (not workers, output or credentials)."""
    return {
        "source": args.source,
        "input": redact_url(args.input.rstrip("/")),
        "split": split,
        "shard_size_mb": args.shard_size_mb,
        "samples_per_shard": args.samples_per_shard,
        "s2_product": args.s2_product,
        "s2_offset": args.s2_offset,
        "max_nonfinite_fraction": args.max_nonfinite_fraction,
        "format_version": FORMAT_VERSION,
        "pipeline_version": __version__,
    }


def run_split(args: argparse.Namespace, spec: SourceSpec, source: Source, split: str, out_url: str,
              storage_options: dict[str, Any]) -> dict[str, Any]:
    import ray
    from tqdm import tqdm

    fs, root = url_to_fs(out_url, storage_options)
    content = _content_args(args, split)
    job_fp = fingerprint(content)
    manifest_path = f"{root}/{MANIFEST}"
    if fs.exists(manifest_path):
        existing = json.loads(read_bytes(fs, manifest_path))
        if existing.get("fingerprint") == job_fp:
            print(f"[{split}] {redact_url(out_url)} already holds a complete shard set for this invocation "
                  f"({existing['totals']['samples']} samples in {existing['totals']['shards']} shards); nothing to do.")
            return existing
        if not args.overwrite:
            raise PreprocessError(
                f"{redact_url(out_url)} already holds a shard set made with different settings; "
                "choose another --output or pass --overwrite"
            )
        retrying(fs.rm_file)(manifest_path)  # the old set is no longer committed from here on
    check_writable(fs, root)
    if is_local(fs):  # staging folders of shards a killed run was still writing
        for stale in fs.glob(f"{root}/.fusmae-shard-*"):
            shutil.rmtree(stale, ignore_errors=True)

    t0 = time.time()
    items, plan_rejects = source.plan(split, _ray_map)
    if not items and not plan_rejects:
        raise PreprocessError(f"{redact_url(args.input)}: no samples found for split {split!r}")
    shards = pack_shards(items, int(args.shard_size_mb * 1024 * 1024), args.samples_per_shard)
    print(f"[{split}] planned {len(items)} samples in {len(shards)} shards "
          f"({len(plan_rejects)} rejected while listing) in {time.time() - t0:.1f}s")

    records: dict[int, dict[str, Any]] = {}
    todo = []
    for index, shard_items in enumerate(shards):
        name = SHARD_NAME.format(split=split, index=index)
        shard_fp = fingerprint([job_fp, [(it.key, it.refs) for it in shard_items]])
        done = _reusable(fs, root, shard_fp, name, args.verify_existing)
        if done is not None:
            records[index] = done
        else:
            todo.append((index, shard_items, shard_fp))
    if records:
        print(f"[{split}] reusing {len(records)} shards completed by an earlier run")

    remote = ray.remote(num_cpus=1, max_retries=3)(build_shard)
    bar = tqdm(total=len(shards), initial=len(records), desc=f"{split} shards", unit="shard",
               disable=args.no_progress, dynamic_ncols=True)
    pending: dict[Any, int] = {}
    queue = list(todo)
    written = sum(r["samples"] for r in records.values())
    quarantined = len(plan_rejects) + sum(len(r["rejections"]) for r in records.values())
    while queue or pending:
        while queue and len(pending) < args.workers:
            index, shard_items, shard_fp = queue.pop(0)
            ref = remote.remote(spec, split, index, shard_items, out_url, shard_fp, storage_options)
            pending[ref] = index
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            index = pending.pop(ref)
            rec = ray.get(ref)
            records[index] = rec
            written += rec["samples"]
            quarantined += len(rec["rejections"])
            bar.update(1)
            bar.set_postfix(samples=written, quarantined=quarantined)
    bar.close()

    # Combine in shard order: the same result whatever order the tasks finished in.
    ordered = [records[i] for i in range(len(shards))]
    s1_moments = BandMoments.zeros(len(source.s1_bands))
    s2_moments = BandMoments.zeros(len(source.s2_bands))
    for rec in ordered:
        s1_moments = s1_moments.merge(BandMoments.from_dict(rec["stats"]["s1"]))
        s2_moments = s2_moments.merge(BandMoments.from_dict(rec["stats"]["s2"]))
    rejections = [r.to_dict() for r in plan_rejects] + [rj for rec in ordered for rj in rec["rejections"]]
    published = [rec for rec in ordered if rec["samples"]]
    n_written = sum(rec["samples"] for rec in published)
    n_input = len(items) + len(plan_rejects)
    if n_written + len(rejections) != n_input:  # every input is accounted for, or the job must not commit
        raise PreprocessError(f"[{split}] internal accounting error: {n_input} inputs, {n_written} written, "
                              f"{len(rejections)} quarantined")
    dtypes = next((rec["dtypes"] for rec in published), {})
    nodata = source.nodata()

    quarantine_data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rejections).encode()
    write_bytes_atomic(fs, f"{root}/{QUARANTINE}", quarantine_data)

    manifest = {
        "format": "fusmae-webdataset",
        "format_version": FORMAT_VERSION,
        "pipeline_version": __version__,
        "fingerprint": job_fp,
        "split": split,
        "source": source.describe(),
        "settings": content,
        "shards": [{"name": rec["name"], "samples": rec["samples"], "bytes": rec["bytes"], "sha256": rec["sha256"]}
                   for rec in published],
        "totals": {
            "shards": len(published),
            "samples": n_written,
            "bytes": sum(rec["bytes"] for rec in published),
            "input_samples": n_input,
            "quarantined": len(rejections),
        },
        "quarantined": len(rejections),
        "quarantine_report": QUARANTINE,
        "image_size": next((rec["shape"] for rec in published), None),
        "modalities": {
            "s1": {"bands": list(source.s1_bands), "dtype": dtypes.get("s1"), "units": "backscatter dB",
                   "nodata": nodata["s1"], "member": "s1.npy", "layout": "(bands, H, W)"},
            "s2": {"bands": list(source.s2_bands), "dtype": dtypes.get("s2"), "units": "reflectance x 10000",
                   "nodata": nodata["s2"], "member": "s2.npy", "layout": "(bands, H, W)"},
        },
        "stats": {
            "s1": s1_moments.summary(list(source.s1_bands)),
            "s2": s2_moments.summary(list(source.s2_bands)),
            "note": "float64 mean and population std over every valid pixel (finite, not no-data) of every written sample",
        },
        "run": {
            # Everything outside `run` is deterministic; `run` describes this particular execution.
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "argv": redact_argv(sys.argv),
            "workers": args.workers,
            "seconds": round(time.time() - t0, 3),
        },
    }
    write_bytes_atomic(fs, manifest_path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    if args.overwrite:  # shards of an older, different plan that this one did not rewrite
        keep = {rec["name"] for rec in published}
        for path in fs.glob(f"{root}/{split}-*.tar"):
            if path.rsplit("/", 1)[-1] not in keep:
                retrying(fs.rm_file)(path)
    print(f"[{split}] wrote {n_written} samples in {len(published)} shards, quarantined {len(rejections)}, "
          f"manifest {redact_url(join(out_url, MANIFEST))}")
    return manifest


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.preprocess",
        description="Shard Sentinel-1/Sentinel-2 archives into WebDataset tar shards (local Ray or a Ray cluster).",
    )
    p.add_argument("--source", required=True, choices=sorted(SOURCES), help="archive layout of --input")
    p.add_argument("--input", required=True, help="fsspec URL of the archive root (path, file://, s3://, gs://, memory://)")
    p.add_argument("--output", required=True, help="fsspec URL of the shard folder")
    p.add_argument("--split", default="train", help="split to process (train, val, validation, test), or 'all'")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)), help="parallel shard tasks")
    p.add_argument("--shard-size-mb", type=float, default=512.0, help="target shard size in MiB")
    p.add_argument("--samples-per-shard", type=int, default=100_000, help="cap on samples per shard")
    p.add_argument("--s2-product", choices=("L1C", "L2A"), default="L1C", help="SSL4EO sources: which S2 product")
    p.add_argument("--s2-offset", choices=("remove", "keep"), default="remove",
                   help="SSL4EO-S12 v1.1 Zarr: remove the +1000 offset of S2 values (default) or keep raw values")
    p.add_argument("--max-nonfinite-fraction", type=float, default=0.0,
                   help="quarantine a sample with more non-finite pixels than this fraction (default: any)")
    p.add_argument("--storage-options", default="{}", help="JSON of extra fsspec options for input and output")
    p.add_argument("--verify-existing", choices=("sha256", "size"), default="sha256",
                   help="how a rerun checks shards left by an earlier run before reusing them")
    p.add_argument("--overwrite", action="store_true", help="replace a shard set made with different settings")
    p.add_argument("--ray-address", default=None, help="Ray cluster address, e.g. 'auto' on a cluster node "
                                                       "(default: $RAY_ADDRESS, else an embedded local instance)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be >= 1")
    if args.shard_size_mb <= 0 or args.samples_per_shard < 1:
        p.error("--shard-size-mb must be > 0 and --samples-per-shard >= 1")
    if not 0.0 <= args.max_nonfinite_fraction <= 1.0:
        p.error("--max-nonfinite-fraction must be in [0, 1]")
    try:
        args.storage_options_dict = json.loads(args.storage_options)
        assert isinstance(args.storage_options_dict, dict)
    except (ValueError, AssertionError):
        p.error("--storage-options must be a JSON object, e.g. '{\"anon\": false}'")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    opts = SourceOptions(args.s2_product, args.s2_offset, args.max_nonfinite_fraction, args.storage_options_dict)
    spec = SourceSpec(args.source, args.input, opts)
    try:
        source = spec.build()
        if not source.fs.exists(source.root):
            raise PreprocessError(f"--input {redact_url(args.input)} does not exist")
        available = source.available_splits()
    except FileNotFoundError as err:
        print(f"error: {redact(str(err))}", file=sys.stderr)
        return 2
    except PreprocessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.split == "all":
        splits = available
        outs = [join(args.output, s) for s in splits]
    else:
        if args.split not in available:
            print(f"error: split {args.split!r} not in {redact_url(args.input)} (found: {', '.join(available)})",
                  file=sys.stderr)
            return 2
        splits, outs = [args.split], [args.output]
    try:
        fs, root = url_to_fs(args.output, args.storage_options_dict)
        check_writable(fs, root)
    except PermissionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _init_ray(args.ray_address, args.workers)
    try:
        for split, out in zip(splits, outs):
            run_split(args, spec, source, split, out, args.storage_options_dict)
    except PreprocessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
