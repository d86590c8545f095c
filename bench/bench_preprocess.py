"""Throughput of the preprocessing job against the floor of merely reading its inputs.

Generates a synthetic archive in a published layout at the real tile size
(264 x 264 px at 10 m), then times, on the same inputs:

1. the floor: the source's own ``plan`` and ``read`` in this process, samples
   decoded and discarded (no encoding, hashing, statistics, tar or Ray);
2. the shard tasks: `pipeline.workers.build_shard` over shards of the job's default
   size (512 MiB) in this process (what one worker does, without Ray), after a
   warm-up task for the imports; also with each shard deleted once built (its
   page-cache pages reused by the next: a long job's steady state), the same without
   the sha256 (what the manifest's hash costs), with the hash and write in the
   calling thread, and with the tar discarded;
3. ``python -m pipeline.preprocess`` as a subprocess with ``--workers 1``, output
   to a local temporary folder;
4. the same with ``--workers 2`` (more with ``--workers 1 2 4``), and the scaling;
5. with ``--s3``, the same jobs again with output to a moto S3 server on loopback.

A job's throughput is taken from the manifest's ``run.seconds`` (planning plus
shard tasks; it excludes interpreter start, imports and ``ray.init``); the
subprocess wall clock is reported beside it. MB are decoded sample bytes
(s1.nbytes + s2.nbytes, 10^6 bytes), the same for every row.

    python bench/bench_preprocess.py                       # ssl4eo-zarr, ~1 min on 2 cores
    python bench/bench_preprocess.py --source ssl4eo-wds                  # the WebDataset release
    python bench/bench_preprocess.py --source ssl4eo-tiff --samples 384
    python bench/bench_preprocess.py --s3 --json bench/results/preprocess.json
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import math
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

# Runnable as a plain script from any directory: the repository root holds `pipeline/`.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import S3_ENV, hardware, load_average, moto_server, print_header, s3_bucket, write_json  # noqa: E402
from pipeline.job import PreprocessSettings  # noqa: E402
from pipeline.sources import SOURCES, Rejection, SourceOptions  # noqa: E402
from pipeline.synthetic import make_ssl4eo_tiff, make_ssl4eo_wds, make_ssl4eo_zarr  # noqa: E402

SIZE = 264  # px per side at 10 m, as in SSL4EO-S12
SEASONS = 4  # samples per location in both SSL4EO layouts (one per season)
LOCATIONS_PER_ZARR_FILE = 64  # as in the published v1.1 files
_PLANNED = re.compile(r"planned (\d+) samples in (\d+) shards .* in ([\d.]+)s")


# -- the archive ---------------------------------------------------------------------------


def make_archive(source: str, root: Path, samples: int) -> dict[str, Any]:
    """Write an archive of at least ``samples`` samples (locations x 4 seasons); describe it."""
    locations = math.ceil(samples / SEASONS)
    if source == "ssl4eo-zarr":
        n_files = math.ceil(locations / LOCATIONS_PER_ZARR_FILE)
        per_file = math.ceil(locations / n_files)
        # Only the products the default reader options open (L1C): L2A would double the generation time.
        make_ssl4eo_zarr(root, splits={"train": n_files}, samples_per_file=per_file, size=SIZE,
                         products=("S1GRD", "S2L1C"))
        return {"locations": n_files * per_file, "files": 2 * n_files, "locations_per_file": per_file}
    if source == "ssl4eo-wds":
        n_tars = math.ceil(locations / LOCATIONS_PER_ZARR_FILE)
        per_tar = math.ceil(locations / n_tars)
        # S1GRD and S2L1C tars only (what the default reader options open); one zipped Zarr member per location
        make_ssl4eo_wds(root, splits={"train": n_tars}, samples_per_shard=per_tar, size=SIZE,
                        products=("S1GRD", "S2L1C"))
        return {"locations": n_tars * per_tar, "files": 2 * n_tars, "locations_per_file": per_tar}
    if source == "ssl4eo-tiff":
        make_ssl4eo_tiff(root, n_locations=locations, size=SIZE)
        return {"locations": locations, "files": locations * SEASONS * (2 + 13)}
    raise ValueError(f"unsupported source {source!r}")


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# -- the floor: read and decode only -------------------------------------------------------


def serial_map(fn, args):
    return [fn(a) for a in args]


def read_floor(source: str, input_url: str, profile: int = 0) -> dict[str, Any]:
    """Plan serially, then read every sample of 'train' in this process and discard it, after reading the first one
    untimed (imports, the checks' compiled kernels: what the shard tasks' warm-up task pays)."""
    from pipeline.workers import one_thread_per_worker

    one_thread_per_worker()  # decode as a shard task does
    src = SOURCES[source](input_url, SourceOptions())
    start = time.perf_counter()
    items, rejects = src.plan("train", serial_map)
    plan_s = time.perf_counter() - start
    for _ in src.read(items[:1], "train"):
        pass
    profiler = cProfile.Profile() if profile else None
    samples = nbytes = rejected = 0
    cpu_start = time.process_time()  # every thread of this process: codecs may decode on threads
    start = time.perf_counter()
    with profiler or contextlib.nullcontext():
        for result in src.read(items, "train"):
            if isinstance(result, Rejection):
                rejected += 1
                continue
            samples += 1
            nbytes += result.s1.nbytes + result.s2.nbytes
    read_s = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_start
    out = {"samples": samples, "rejected": rejected + len(rejects), "bytes": nbytes,
           "plan_seconds": plan_s, "read_seconds": read_s, "cpu_seconds": cpu_s, "cores_busy": cpu_s / read_s}
    if profiler is not None:
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(profile)
        out["profile"] = buf.getvalue()
    return out


# -- the shard tasks in this process -----------------------------------------------------------


WRITERS = ("thread", "recycle", "unhashed", "calling", "discard")
"""How `shard_tasks` has the shard writer hash and write: on its thread (the job's way); the same with each shard
deleted once built, so that the next one is written into the page-cache pages it freed; the same without the sha256
(a comparison only: the manifest needs it); in the calling thread (``background=False``, the way before the thread);
or on its thread into /dev/null (the tar discarded)."""

WRITER_ROWS = {
    "thread": "shard tasks (build_shard), one process, no Ray",
    "recycle": "the same, each shard deleted once built (page-cache pages reused)",
    "unhashed": "the same, each shard deleted once built, no sha256 (what the hash costs)",
    "calling": "the same, sha256 + write in the calling thread",
    "discard": "the same, tar discarded (/dev/null)",
}


class _NoHash:
    """A hashlib stand-in that hashes nothing (the ``unhashed`` row)."""

    def update(self, data: Any) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


def shard_tasks(source: str, input_url: str, shard_mb: float, out: Path, writer: str = "thread") -> dict[str, Any]:
    """What one worker does without Ray: `build_shard` over the job's shards in this process, after a one-sample
    warm-up task that pays the imports (webdataset imports torch: ~1.5-2.5 s per worker process). ``writer``
    (`WRITERS`) picks the comparison rows: ``calling`` hashes and writes in the calling thread; ``discard`` hashes
    every byte as the job does but writes the tar to /dev/null (an empty file takes its place, so the task
    completes as usual): the worker's own work without the page-cache write of its output, which on a virtual
    machine costs several times more where the guest touches memory the host has not backed yet. ``recycle`` writes as
    the job does and deletes each shard once built: the next shard's page-cache pages are those it freed, as in a
    long job once the page cache has filled the node's memory (or in one staging shards for an object store).
    ``unhashed`` is ``recycle`` without the sha256."""
    import functools

    from pipeline import workers
    from pipeline.job import SourceSpec
    from pipeline.plan import ShardTask, pack_shards
    from pipeline.shards import ShardWriter

    class UnhashedWriter(ShardWriter):
        def __init__(self, path: str, **kwargs: Any):
            super().__init__(path, **kwargs)
            self._sha = _NoHash()

    class DiscardingWriter(ShardWriter):
        def __init__(self, path: str, **kwargs: Any):
            super().__init__(os.devnull, **kwargs)
            self.target = path

        def close(self) -> None:
            super().close()
            Path(self.target).touch()

    def build_shard(*a):
        saved = workers.ShardWriter
        workers.ShardWriter = (DiscardingWriter if writer == "discard" else UnhashedWriter if writer == "unhashed"
                               else functools.partial(ShardWriter, background=writer != "calling"))
        try:
            return workers.build_shard(*a)
        finally:
            workers.ShardWriter = saved

    options = SourceOptions()
    items, _ = SOURCES[source](input_url, options).plan("train", serial_map)
    spec = SourceSpec(source, input_url, options)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    build_shard(spec, "train", ShardTask(-1, "warm-up.tar", items[:1], "warm-up"), str(out), {})
    warm_s = time.perf_counter() - start
    shards = pack_shards(items, int(shard_mb * 1024 * 1024), 10**9)  # as PreprocessSettings.shard_bytes
    samples = 0
    cpu_start, start = time.process_time(), time.perf_counter()
    for k, shard in enumerate(shards):
        samples += build_shard(spec, "train", ShardTask(k, f"train-{k:06d}.tar", shard, f"bench-{k}"), str(out),
                               {})["samples"]
        if writer in ("recycle", "unhashed"):
            (out / f"train-{k:06d}.tar").unlink()
    seconds = time.perf_counter() - start
    return {"samples": samples, "seconds": seconds, "cores_busy": (time.process_time() - cpu_start) / seconds,
            "warm_up_seconds": warm_s, "shards": len(shards)}


# -- the job -------------------------------------------------------------------------------


def run_job(source: str, input_url: str, output_url: str, workers: int, shard_size_mb: float) -> dict[str, Any]:
    """Run ``python -m pipeline.preprocess`` as a user would; wall clock and the manifest's facts."""
    from pipeline.storage import read_bytes, url_to_fs

    cmd = [sys.executable, "-m", "pipeline.preprocess", "--source", source, "--input", input_url,
           "--output", output_url, "--workers", str(workers), "--shard-size-mb", str(shard_size_mb),
           "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
                 f"\n--- stderr\n{proc.stderr[-5000:]}")
    planned = _PLANNED.search(proc.stdout)
    storage_options: dict[str, Any] = {"skip_instance_cache": True} if output_url.startswith("s3://") else {}
    fs, root = url_to_fs(output_url, storage_options)
    manifest = json.loads(read_bytes(fs, f"{root}/manifest.json"))
    return {
        "workers": workers,
        "wall_seconds": wall,
        "job_seconds": manifest["run"]["seconds"],
        "plan_seconds": manifest["run"].get("plan_seconds", float(planned[3]) if planned else None),
        "samples": manifest["totals"]["samples"],
        "shards": manifest["totals"]["shards"],
        "tar_bytes": manifest["totals"]["bytes"],
        "quarantined": manifest["totals"]["quarantined"],
        # the job's own account of its shard phase (manifest run section): wall clock, and the tasks' durations
        "shard_seconds": manifest["run"].get("shard_seconds"),
        "task_seconds": manifest["run"].get("task_seconds"),
        "samples_built": manifest["run"].get("samples_built"),
    }


# -- the report ----------------------------------------------------------------------------


def rates(samples: int, seconds: float, bytes_per_sample: float, workers: int = 1) -> dict[str, float]:
    sps = samples / seconds
    return {
        "samples_per_s": sps,
        "mb_per_s": sps * bytes_per_sample / 1e6,
        "samples_per_s_per_worker": sps / workers,
        "mb_per_s_per_worker": sps * bytes_per_sample / 1e6 / workers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="ssl4eo-zarr", choices=["ssl4eo-zarr", "ssl4eo-wds", "ssl4eo-tiff"])
    parser.add_argument("--samples", type=int, default=None,
                        help="samples to generate (locations x 4 seasons); default 768 for ssl4eo-zarr and "
                             "ssl4eo-wds, 384 for ssl4eo-tiff (~1 min in all on 2 cores)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="job runs, one per value; scaling is against the first")
    parser.add_argument("--shard-size-mb", type=float, default=64.0,
                        help="the jobs' --shard-size-mb; small enough for many more shards than workers, "
                             "so that the last shard does not limit the scaling (the job's default is 512)")
    parser.add_argument("--task-shard-size-mb", type=float, default=PreprocessSettings.shard_size_mb,
                        help="shard size of the shard-task rows (default: the job's default, %(default)s): one "
                             "worker's work as the job cuts it by default, a location split between two shards "
                             "(read twice) and each task's start as rare as there")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of the floor and of each job (interleaved); the fastest is reported, "
                             "all go to --json")
    parser.add_argument("--s3", action="store_true", help="also run every job with output to a moto S3 server")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="cProfile the floor's read loop and print its top N functions by own time")
    parser.add_argument("--tmpdir", type=Path, default=None, help="where the archive and outputs go")
    parser.add_argument("--keep", action="store_true", help="keep the archive and outputs")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.repeat < 1 or (args.samples is not None and args.samples < 1) or min(args.workers) < 1:
        parser.error("--repeat, --samples and --workers must be >= 1")
    samples_wanted = args.samples or {"ssl4eo-zarr": 768, "ssl4eo-wds": 768, "ssl4eo-tiff": 384}[args.source]

    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="fusmae-bench-preprocess-", dir=args.tmpdir))
    try:
        start = time.perf_counter()
        archive = make_archive(args.source, work / "archive", samples_wanted)
        archive.update(generate_seconds=time.perf_counter() - start, disk_bytes=disk_bytes(work / "archive"))
        input_url = str(work / "archive")

        # The fastest of --repeat runs: on a shared machine the least disturbed one.
        floors = [read_floor(args.source, input_url) for _ in range(args.repeat)]
        floor = min(floors, key=lambda f: f["read_seconds"])
        # The profiler slows the loop down: a run of its own, not timed.
        profile = read_floor(args.source, input_url, args.profile)["profile"] if args.profile else None
        floor["all_read_seconds"] = [f["read_seconds"] for f in floors]
        bytes_per_sample = floor["bytes"] / floor["samples"]
        floor.update(rates(floor["samples"], floor["read_seconds"], bytes_per_sample))

        # interleaved, the fastest of --repeat each: the writer's thread (the job's way), the calling thread, and
        # the tar discarded
        tries: dict[str, list[dict[str, Any]]] = {w: [] for w in WRITERS}
        for _ in range(args.repeat):
            for writer in WRITERS:
                run = shard_tasks(args.source, input_url, args.task_shard_size_mb, work / "tasks", writer)
                if run["samples"] != floor["samples"]:
                    sys.exit(f"the shard tasks wrote {run['samples']} samples, the floor read {floor['samples']}")
                tries[writer].append(run)
                shutil.rmtree(work / "tasks", ignore_errors=True)
        best = {w: min(tries[w], key=lambda r: r["seconds"]) for w in WRITERS}
        warm_up_s = max(r["warm_up_seconds"] for runs in tries.values() for r in runs)
        for run in best.values():
            run.update(rates(run["samples"], run["seconds"], bytes_per_sample))
        tasks, recycled, unthreaded, discarded = best["thread"], best["recycle"], best["calling"], best["discard"]

        targets = [("local", None)]
        stack = contextlib.ExitStack()
        if args.s3:
            endpoint = stack.enter_context(moto_server(work / "moto.log"))
            # This process (bucket creation, manifest read) and the jobs see the server as AWS.
            os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
            targets.append(("s3", endpoint))
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        with stack:
            for target, endpoint in targets:
                for _ in range(args.repeat):  # interleaved: 1, 2, 1, 2 workers, so drift hits both alike
                    for workers in args.workers:
                        if endpoint:
                            output_url = f"{s3_bucket(endpoint)}/shards"
                        else:
                            output_url = str(work / f"out-w{workers}-{uuid.uuid4().hex[:8]}")
                        job = run_job(args.source, input_url, output_url, workers, args.shard_size_mb)
                        if job["samples"] != floor["samples"]:
                            sys.exit(f"the job wrote {job['samples']} samples, the floor read {floor['samples']}")
                        runs.setdefault((target, workers), []).append(job)
                        if endpoint is None and not args.keep:
                            shutil.rmtree(output_url, ignore_errors=True)  # ~2 MB a sample: do not pile up
        jobs = []
        for (target, workers), tries in runs.items():
            job = dict(min(tries, key=lambda j: j["job_seconds"]), target=target)
            job["all_job_seconds"] = [j["job_seconds"] for j in tries]
            job.update(rates(job["samples"], job["job_seconds"], bytes_per_sample, workers))
            job["wall_samples_per_s"] = job["samples"] / job["wall_seconds"]
            job["over_floor_per_worker"] = job["samples_per_s_per_worker"] / floor["samples_per_s"]
            if job["shard_seconds"]:  # the shard tasks' wall clock: planning and the commit left out
                shard_sps = job["samples_built"] / job["shard_seconds"]
                job["shard_phase_over_floor_per_worker"] = shard_sps / workers / floor["samples_per_s"]
            if job["task_seconds"]:  # inside the tasks: what a busy worker sustains, scheduling gaps left out
                job["in_task_over_floor"] = job["samples_built"] / job["task_seconds"] / floor["samples_per_s"]
            jobs.append(job)
        for target, _ in targets:
            same = [j for j in jobs if j["target"] == target]
            for j in same:
                j["scaling_vs_first"] = j["samples_per_s"] / same[0]["samples_per_s"]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    hw = hardware(packages=("ray", "numpy", "zarr", "numba"))
    hw["load_avg_1m"] = f"{load_before} at start, {load_average()} at end"
    setup = {
        "source": args.source, "size_px": SIZE, "samples": floor["samples"], "locations": archive["locations"],
        "input_files": archive["files"], "archive_mb": round(archive["disk_bytes"] / 1e6, 1),
        "decoded_mb_per_sample": round(bytes_per_sample / 1e6, 3), "shard_size_mb": args.shard_size_mb,
        "task_shard_size_mb": args.task_shard_size_mb, "task_shards": tasks["shards"],
        "shards": jobs[0]["shards"], "workers": args.workers, "s3": args.s3, "repeat": args.repeat,
        "generate_s": round(archive["generate_seconds"], 1), "input": "local disk (page cache warm)",
    }

    print_header(f"Preprocessing throughput: {args.source}, job vs read-only floor", setup, hw)
    print("| run | output | workers | wall s | job s | samples/s | MB/s | samples/s/worker | MB/s/worker "
          "| per worker / floor | shard phase, per worker / floor | in task / floor |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| floor: plan + read, one process | none | 1 | {floor['read_seconds']:.2f} | – "
          f"| {floor['samples_per_s']:.1f} | {floor['mb_per_s']:.0f} | {floor['samples_per_s']:.1f} "
          f"| {floor['mb_per_s']:.0f} | 1.00 | – | – |")
    for writer, run in best.items():
        print(f"| {WRITER_ROWS[writer]} | {'none' if writer == 'discard' else 'local'} | 1 | {run['seconds']:.2f} | – "
              f"| {run['samples_per_s']:.1f} | {run['mb_per_s']:.0f} | {run['samples_per_s']:.1f} "
              f"| {run['mb_per_s']:.0f} | {run['samples_per_s'] / floor['samples_per_s']:.2f} | – | – |")
    dash = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    for j in jobs:
        print(f"| preprocess | {j['target']} | {j['workers']} | {j['wall_seconds']:.2f} | {j['job_seconds']:.2f} "
              f"| {j['samples_per_s']:.1f} | {j['mb_per_s']:.0f} | {j['samples_per_s_per_worker']:.1f} "
              f"| {j['mb_per_s_per_worker']:.0f} | {j['over_floor_per_worker']:.2f} "
              f"| {dash(j.get('shard_phase_over_floor_per_worker'))} | {dash(j.get('in_task_over_floor'))} |")
    print(f"\nFloor: planning took {floor['plan_seconds']:.2f} s (not in the floor's wall s, which is the read "
          f"loop only); the read loop kept {floor['cores_busy']:.2f} cores busy (CPU time of all its threads / "
          f"wall), so per worker / floor compares one worker with that. Job s is the manifest's run.seconds: "
          f"planning (on Ray) plus the shard tasks, without interpreter start, imports and ray.init; the jobs' "
          f"throughputs are computed from it. Wall s is the subprocess's whole life. The shard phase is the "
          f"manifest's run.shard_seconds, the wall clock of the shard tasks: planning (a fixed cost here, Ray "
          f"worker start and imports, ~1-2 s) and the commit left out. In task is run.samples_built / "
          f"run.task_seconds, the shard tasks' own durations summed: what one busy worker sustains, Ray's "
          f"scheduling gaps left out and each worker's first-task start-up (imports, the statistics kernel) in."
          + (f" Each row is the fastest of {args.repeat} runs (all in --json)." if args.repeat > 1 else ""))
    busy = "; ".join(f"{w} {r['cores_busy']:.2f} cores busy, "
                     f"{r['samples_per_s'] / floor['samples_per_s'] / r['cores_busy']:.2f} per busy core"
                     for w, r in best.items())
    print(f"- shard tasks: what one worker does (read, check, statistics, tar, sha256, the progress record) on "
          f"{tasks['shards']} shards of {args.task_shard_size_mb:g} MiB, in this process after a "
          f"{warm_up_s:.1f} s warm-up task (imports, the "
          f"first run's; later runs find them loaded). The sha256 and the file write run on the shard "
          f"writer's thread, so a worker keeps more than one core busy (CPU time of all threads / wall); per busy "
          f"core / floor is per worker / floor over that, what a node with one worker per core would see: {busy}. "
          f"The job rows add Ray's start, its own processes (dashboard agent, log monitor, ...) sharing the cores, "
          f"planning and the per-task hand-over.")
    for j in jobs:
        plan = f"{j['plan_seconds']:.1f} s planning" if j["plan_seconds"] is not None else "planning not reported"
        print(f"- {j['target']}, {j['workers']} worker(s): {plan}; start-up and shutdown outside run.seconds "
              f"{j['wall_seconds'] - j['job_seconds']:.1f} s; {j['wall_samples_per_s']:.1f} samples/s by wall "
              f"clock; tar output {j['tar_bytes'] / 1e6:.0f} MB in {j['shards']} shards")
    for target, _ in targets:
        same = [j for j in jobs if j["target"] == target]
        for j in same[1:]:
            print(f"\nScaling ({target}): {j['workers']} workers / {same[0]['workers']} worker(s) = "
                  f"{j['scaling_vs_first']:.2f}x throughput (run.seconds), on a machine with "
                  f"{hw['usable_cores']} usable cores (the Ray driver and raylet share them"
                  + (", and so does the moto server" if target == "s3" else "") + ")")
    if jobs[0]["shards"] < 4 * max(args.workers):
        print(f"\nNote: only {jobs[0]['shards']} shards for up to {max(args.workers)} workers: the last shards leave "
              "workers idle, so the scaling understates the workers' own; raise --samples or lower --shard-size-mb.")
    if args.profile:
        print("\n### cProfile of the floor's read loop (by own time)\n")
        print("```\n" + profile.strip() + "\n```")

    write_json(args.json, {"setup": setup, "hardware": hw, "archive": archive, "floor": floor, "shard_tasks": tasks,
                           "shard_tasks_shards_deleted": recycled, "shard_tasks_unhashed": best["unhashed"],
                           "shard_tasks_calling_thread": unthreaded, "shard_tasks_tar_discarded": discarded,
                           "jobs": jobs})


if __name__ == "__main__":
    main()
