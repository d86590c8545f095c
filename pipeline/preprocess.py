"""Turn a Sentinel-1/Sentinel-2 archive into WebDataset shards, on Ray.

Locally (starts an embedded Ray instance)::

    python -m pipeline.preprocess --source ssl4eo-zarr --input ./ssl4eo --output ./shards

On a cluster (``ray submit`` uploads only this file; the cluster YAML installs
the project on every node)::

    ray submit launch/ray/cluster.yaml pipeline/preprocess.py -- \\
        --source ssl4eo-zarr --input s3://bucket/ssl4eo-s12 --output s3://bucket/shards

The job is planned by inventory tasks on Ray (Zarr metadata, tar indexes, folder
listings; the driver keeps a 32-byte summary per sample), cut into shards
deterministically, and each shard is built by one Ray task that streams its
samples into a local tar and publishes it atomically. A small progress record
per shard makes a killed run resumable; ``manifest.json``, written last, is the
commit point.

This module is the command line: it parses the flags into `PreprocessSettings`
(`pipeline.job`) and runs each split through its steps: `check_output` and
`commit_split` (`pipeline.commit`), `plan_split` (`pipeline.plan`) and
`run_shards` (`pipeline.workers`). ``--plan-only`` stops after planning and prints
what a run would do (samples, shards, rejections), writing nothing.
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
import contextlib
import json
import logging
import time
from collections import Counter
from typing import Any, Optional, Sequence

from pipeline.commit import check_output, commit_split
from pipeline.job import S2_OFFSETS, S2_PRODUCTS, VERIFY_MODES, PreprocessError, PreprocessSettings, SourceSpec
from pipeline.plan import plan_split
from pipeline.sources import SOURCES, Source
from pipeline.lease import Lease, LeaseHeld
from pipeline.signals import sigterm_as_exit
from pipeline.logs import setup_logging
from pipeline.storage import (StorageUnavailable, check_writable, join, redact, redact_url, retrying, set_retry_window,
                              url_to_fs)
from pipeline.inventory import ray_inventory
from pipeline.workers import init_ray, run_shards

__all__ = ["PreprocessError", "PreprocessSettings", "main", "parse_args", "preview_split", "run_job", "run_split"]


def run_split(settings: PreprocessSettings, spec: SourceSpec, source: Source, split: str,
              out_url: str) -> dict[str, Any]:
    """Shard ``split`` of the archive into ``out_url`` (Ray initialised, the output's lease held: see `lease`);
    returns the committed manifest's body.

    Raises PreprocessError for a problem with the invocation or the input."""
    done = check_output(settings, split, out_url)
    if done is not None:
        return done
    plan = plan_split(settings, source, split, out_url, ray_inventory)
    records, phase = run_shards(settings, spec, plan, out_url)
    return commit_split(settings, plan, records, source, out_url, phase).to_dict()


def preview_split(settings: PreprocessSettings, source: Source, split: str, out_url: str) -> dict[str, Any]:
    """Plan ``split`` as a run would (Ray initialised), print the plan and return its summary; writes nothing."""
    plan = plan_split(settings, source, split, out_url, ray_inventory)
    reasons = Counter(r.reason for r in plan.rejections)
    summary = {"split": split, "samples": len(plan.items), "shards": len(plan.tasks), "reusable": len(plan.reused),
               "rejected_while_listing": dict(sorted(reasons.items())),
               "planning_seconds": round(time.time() - plan.started, 2)}
    rejected = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())) or "none"
    print(f"[{split}] plan only: {summary['samples']} samples in {summary['shards']} shards, "
          f"{summary['reusable']} of them complete from an earlier run; rejected while listing: {rejected}; "
          "nothing written")
    return summary


def lease(settings: PreprocessSettings, split: str, out_url: str) -> Lease:
    """The lease of one split's output: one writer per output, taken before anything is written or cleaned."""
    return Lease(out_url, f"pipeline.preprocess --split {split}", settings.storage_options, force=settings.force)


def run_job(settings: PreprocessSettings) -> int:
    """Every split ``settings`` asks for; the exit status: 0, or 2 after printing the error to stderr."""
    spec = settings.source_spec()
    set_retry_window(settings.retry_window_s)  # this process, and through the environment its Ray workers
    try:
        source = spec.build()
        if not retrying(source.fs.exists)(source.root):
            raise PreprocessError(f"--input {redact_url(settings.input)} does not exist")
        available = source.available_splits()
    except FileNotFoundError as err:
        return _fail(redact(str(err)))
    except PermissionError as err:  # refused credentials
        return _fail(f"--input {redact_url(settings.input)}: access denied ({redact(str(err))}); check the credentials")
    except PreprocessError as err:
        return _fail(str(err))
    except StorageUnavailable as err:  # the input's listing outlasted the retry window
        return _unavailable(err)
    if settings.split == "all":
        targets = [(split, join(settings.output, split)) for split in available]
    elif settings.split in available:
        targets = [(settings.split, settings.output)]
    else:
        return _fail(f"split {settings.split!r} not in {redact_url(settings.input)} (found: {', '.join(available)})")
    try:
        fs, root = url_to_fs(settings.output, settings.storage_options)
        if not settings.plan_only:
            check_writable(fs, root, settings.output)
    except PermissionError as err:
        return _fail(str(err))
    except StorageUnavailable as err:
        return _unavailable(err)
    try:
        with contextlib.ExitStack() as held:
            # Every output's lease before Ray starts: a run that would be refused is refused at once, and
            # no split of a multi-split job is half-written because another run holds a later one.
            for split, out_url in targets if not settings.plan_only else ():
                held.enter_context(lease(settings, split, out_url))
            init_ray(settings.ray_address, settings.workers)
            for split, out_url in targets:
                if settings.plan_only:
                    preview_split(settings, source, split, out_url)
                else:
                    run_split(settings, spec, source, split, out_url)
    except (PreprocessError, LeaseHeld) as err:
        return _fail(str(err))
    except StorageUnavailable as err:
        return _unavailable(err)
    except FileNotFoundError as err:  # a source's planning found the split's files missing or incomplete
        return _fail(redact(str(err)))
    return 0


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _unavailable(err: StorageUnavailable) -> int:
    """Exit status 3 after an outage longer than the retry window, its message printed. Raised in a Ray task, it
    arrives as Ray's error, an instance of its cause's class with the traceback in its text: the cause is printed."""
    cause = getattr(err, "cause", None)
    print(f"error: {cause if isinstance(cause, StorageUnavailable) else err}", file=sys.stderr)
    return 3


def _parser() -> argparse.ArgumentParser:
    # No argparse defaults: an option not given is left out, so PreprocessSettings holds the only defaults.
    p = argparse.ArgumentParser(
        prog="python -m pipeline.preprocess", argument_default=argparse.SUPPRESS,
        description="Shard Sentinel-1/Sentinel-2 archives into WebDataset tar shards (local Ray or a Ray cluster).",
    )
    p.add_argument("--source", required=True, choices=sorted(SOURCES), help="archive layout of --input")
    p.add_argument("--input", required=True, help="fsspec URL of the archive root (path, file://, s3://, gs://)")
    p.add_argument("--output", required=True, help="fsspec URL of the shard folder")
    p.add_argument("--split", help="split to process (train, val, validation, test), or 'all'")
    p.add_argument("--workers", type=int, help="parallel shard tasks")
    p.add_argument("--shard-size-mb", type=float, help="target shard size in MiB")
    p.add_argument("--samples-per-shard", type=int, help="cap on samples per shard")
    p.add_argument("--s2-product", choices=S2_PRODUCTS, help="SSL4EO sources: which S2 product")
    p.add_argument("--s2-offset", choices=S2_OFFSETS,
                   help="SSL4EO-S12 v1.1 Zarr: remove the +1000 offset of S2 values (default) or keep raw values")
    p.add_argument("--max-nonfinite-fraction", type=float,
                   help="quarantine a sample with more non-finite pixels than this fraction (default: any)")
    p.add_argument("--max-pair-gap-days", type=float,
                   help="SSL4EO sources: quarantine S1/S2 pairs further apart than this many days (default 45)")
    p.add_argument("--storage-options", help="JSON of extra fsspec options for input and output")
    p.add_argument("--read-ahead", type=int, metavar="N",
                   help="Zarr releases (WebDataset or chunk files) on an object store: locations each worker fetches "
                        "ahead, in batches of N whose neighbouring members are one request (default 4, 0 none); 8 "
                        "for a distant store")
    p.add_argument("--verify-existing", choices=VERIFY_MODES,
                   help="how a rerun checks shards left by an earlier run before reusing them")
    p.add_argument("--overwrite", action="store_true", help="replace a shard set made with different settings")
    p.add_argument("--force", action="store_true",
                   help="take over the output's lease from a run that is gone but whose heartbeat is still fresh")
    p.add_argument("--retry-window-s", type=float,
                   help="seconds storage calls retry transient errors before the job stops (default 900)")
    p.add_argument("--ray-address", help="Ray cluster address, e.g. 'auto' on a cluster node "
                                         "(default: $RAY_ADDRESS, else an embedded local instance)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--plan-only", action="store_true",
                   help="list and plan the splits (on Ray), print samples, shards and rejections; write nothing")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> PreprocessSettings:
    """The settings of a command line; a bad one exits 2 with the usage and a message naming the option."""
    p = _parser()
    given = vars(p.parse_args(argv))
    if "no_progress" in given:
        given["progress"] = not given.pop("no_progress")
    if "storage_options" in given:
        try:
            given["storage_options"] = json.loads(given["storage_options"])
        except ValueError:
            p.error("--storage-options must be a JSON object, e.g. '{\"anon\": false}'")  # exits 2
    try:
        return PreprocessSettings(**given)
    except PreprocessError as err:
        p.error(str(err))  # prints the usage and the message, exits 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        setup_logging(logging.INFO)
    except ValueError as err:  # a bad FUSMAE_LIBRARY_LOG_LEVEL
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings = parse_args(argv)
    # SIGTERM (`ray job stop`, a preemption) unwinds through the leases, which give the outputs back. ray.init
    # puts Ray's own handler in place (sys.exit, the same unwinding); the grace's deadline stays.
    with sigterm_as_exit(what="preprocessing"):
        return run_job(settings)


if __name__ == "__main__":
    sys.exit(main())
