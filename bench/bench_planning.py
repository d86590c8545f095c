"""Planning at archive scale: listing and inventorying many input files on S3, and what the driver keeps.

Generates an SSL4EO-S12 v1.1 Zarr archive of ``--files`` small files (half S1GRD,
half S2L1C, ``--locations`` locations of 4 seasons each, tiny images: the plan reads
metadata only, so the pixel size does not matter), uploads it to a moto S3 server on
loopback, then:

1. runs ``python -m pipeline.preprocess --plan-only`` on it with each of ``--workers`` and takes
   the job's own "planned N samples in M shards ... in X s" line: listing on the
   driver, one inventory task per S1/S2 file pair on Ray, shard cutting;
2. plans the same input in this process (serially) under ``tracemalloc``: the bytes the
   driver holds per planned sample, which decide its memory on a full archive.

The extrapolation to the published archives is written out below the table: SSL4EO-S12
v1.1 has 3,846 Zarr files per modality of 64 locations x 4 seasons (~985k samples).

    python bench/bench_planning.py                          # 1,000 files, ~2 min on 2 cores
    python bench/bench_planning.py --files 200 --workers 1  # a smoke run
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import (hardware, load_average, moto_server, plan_only_job, print_header,  # noqa: E402
                    upload_archive, write_json)
from pipeline.sources import SOURCES, SourceOptions  # noqa: E402
from pipeline.synthetic import make_ssl4eo_zarr  # noqa: E402

SEASONS = 4
FULL_FILES_PER_MODALITY = 3846  # SSL4EO-S12 v1.1 (DLR-MF-DAS/SSL4EO-S12-v1.1 README)
FULL_LOCATIONS_PER_FILE = 64


def plan_job(input_url: str, output: Path, workers: int) -> dict[str, Any]:
    return plan_only_job("ssl4eo-zarr", input_url, output, workers)


def plan_in_process(input_url: str) -> dict[str, Any]:
    """The plan in this process, serially, after a warm-up plan (imports, clients): its time, the memory its
    result holds (tracemalloc: allocated by the plan and still alive while its items are), and the heap the items
    alone take as Python objects: what a driver holding them would keep (it did before `pipeline.inventory`)."""

    def plan() -> tuple[Any, list]:
        return SOURCES["ssl4eo-zarr"](input_url, SourceOptions()).plan("train", lambda f, a: [f(x) for x in a])

    plan()
    tracemalloc.start()
    start = time.perf_counter()
    items, rejects = plan()
    seconds = time.perf_counter() - start
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    pickled = pickle.dumps(list(items))
    tracemalloc.start()
    copy = pickle.loads(pickled)  # fresh objects, shared strings still shared (pickle's memo)
    items_heap, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del copy
    return {"samples": len(items), "rejections": len(rejects), "seconds": seconds, "held_bytes": held,
            "peak_bytes": peak, "pickled_bytes": len(pickled), "items_heap_bytes": items_heap,
            "summary_bytes": items.driver_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000, help="input files (S1GRD + S2L1C), even")
    parser.add_argument("--locations", type=int, default=1, help="locations per file (4 samples each)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.files < 2 or args.files % 2 or args.locations < 1 or min(args.workers) < 1:
        parser.error("--files must be even and >= 2, --locations and --workers >= 1")
    pairs = args.files // 2
    load_before = load_average()
    with tempfile.TemporaryDirectory(prefix="fusmae-bench-planning-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        make_ssl4eo_zarr(str(work / "archive"), splits={"train": pairs}, samples_per_file=args.locations, size=12,
                         seed=0, products=("S1GRD", "S2L1C"))
        generate_s = time.perf_counter() - start
        with moto_server(work / "moto.log") as endpoint:
            input_url, upload_s = upload_archive(endpoint, work / "archive")
            local = plan_in_process(input_url)
            jobs = [plan_job(input_url, work / f"out-{w}", w) for w in args.workers]
    for job in jobs:
        if job["samples"] != pairs * args.locations * SEASONS:
            sys.exit(f"planned {job['samples']} samples, the archive holds {pairs * args.locations * SEASONS}")

    setup = {"files": args.files, "pairs": pairs, "locations_per_file": args.locations, "samples": jobs[0]["samples"],
             "store": "moto S3 on loopback", "generate_s": round(generate_s, 1), "upload_s": round(upload_s, 1)}
    hw = hardware(packages=("ray", "s3fs", "zarr"))
    hw["load_avg_1m"] = f"{load_before} at start, {load_average()} at end"
    print_header("Planning at archive scale: ssl4eo-zarr on S3", setup, hw)
    print("| run | workers | plan s | s per 1,000 files | s per 1,000 files x workers | wall s | driver keeps |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    per_k_local = local["seconds"] / args.files * 1000
    print(f"| in this process, serial, under tracemalloc (slower) | 1 | {local['seconds']:.2f} | {per_k_local:.2f} "
          f"| {per_k_local:.2f} | – | {local['items_heap_bytes'] / 1e6:.1f} MB of items (listed here) |")
    for j in jobs:
        per_k = j["plan_seconds"] / args.files * 1000
        print(f"| preprocess (Ray) | {j['workers']} | {j['plan_seconds']:.2f} | {per_k:.2f} "
              f"| {per_k * j['workers']:.2f} | {j['wall_seconds']:.1f} | {j['driver_mb']:.2f} MB of summaries |")
    per_sample = local["pickled_bytes"] / local["samples"]
    heap_per_sample = local["items_heap_bytes"] / local["samples"]
    summary_per_sample = local["summary_bytes"] / local["samples"]
    per_file = max(0, local["held_bytes"] - local["items_heap_bytes"] - local["summary_bytes"]) / args.files
    full_files = 2 * FULL_FILES_PER_MODALITY
    full_samples = FULL_FILES_PER_MODALITY * FULL_LOCATIONS_PER_FILE * SEASONS
    best = min(jobs, key=lambda j: j["plan_seconds"])
    print(f"\nDriver memory: a planned sample is {heap_per_sample:.0f} bytes as Python objects ({per_sample:.0f} "
          f"pickled: what an inventory task leaves in Ray's object store); the driver keeps "
          f"{summary_per_sample:.0f} bytes of it (size estimate, digest, key hash: `pipeline.inventory`). Besides "
          f"the items the serial plan left {per_file / 1e3:.1f} kB per input file allocated (storage clients' caches, "
          f"rejections); peak while planning {local['peak_bytes'] / 1e6:.1f} MB.")
    print(f"\nExtrapolated to SSL4EO-S12 v1.1 ({full_files:,} files, {full_samples:,} samples): planning "
          f"~{best['plan_seconds'] / args.files * full_files:.0f} s at {best['workers']} worker(s) on this machine, "
          f"if it scales with the file count (here {FULL_LOCATIONS_PER_FILE / args.locations:g}x fewer locations per "
          f"file, so the per-file cost is a lower bound); the driver keeps ~{summary_per_sample * full_samples / 1e6:.0f} MB of "
          f"summaries, where holding the items would take ~{heap_per_sample * full_samples / 1e9:.2f} GB "
          f"(~{per_sample * full_samples / 1e9:.2f} GB pickled in the object store, spilled to disk when it fills).")
    write_json(args.json, {"setup": setup, "hardware": hw, "in_process": local, "jobs": jobs})


if __name__ == "__main__":
    main()
