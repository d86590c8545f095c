"""Uploading a shard (or a checkpoint file) to S3: the memory it takes and how long, with s3fs's own multipart
settings against the part size and concurrency `pipeline.storage.put_atomic` passes (`UPLOAD_PART_BYTES`).

s3fs reads ``max_concurrency`` parts of ``chunksize`` bytes into memory and sends them together: 10 parts of
50 MiB by default. Each preprocessing worker uploads every shard it builds that way (512 MiB by default), and each
training rank its checkpoint files. Each upload here runs in a fresh process; its memory is the peak resident set
(``ru_maxrss``) over the process's resident set just before the upload, after the imports and a first request.
The store is a moto server on loopback: its speed is this machine's, not a real store's.

    python bench/bench_upload.py                  # one 512 MiB file, 3 rounds, ~2 min on 2 cores
    python bench/bench_upload.py --mb 128 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Runnable as a plain script from any directory: the repository root holds `pipeline/`.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import S3_ENV, hardware, load_average, moto_server, print_header, s3_bucket, write_json  # noqa: E402

VARIANTS = {
    "s3fs": "s3fs's defaults (`fs.put_file`: 50 MiB parts, 10 at a time)",
    "put_atomic": "`put_atomic` (8 MiB parts, 10 at a time)",
}


def child(variant: str, path: str, dest: str) -> dict[str, Any]:
    """One upload in this (fresh) process: seconds and memory."""
    import s3fs

    from pipeline.storage import put_atomic

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.ls(dest.split("/", 1)[0])  # the client made, a first request answered: what the worker has before
    before = _rss()
    start = time.perf_counter()
    if variant == "s3fs":
        fs.put_file(path, dest)
    else:
        put_atomic(fs, path, dest)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    if fs.size(dest) != os.path.getsize(path):
        raise SystemExit(f"{dest}: {fs.size(dest)} bytes uploaded, {os.path.getsize(path)} expected")
    return {"seconds": seconds, "rss_before": before, "peak_rss": peak, "peak_over_before": peak - before}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=512, help="file size in MiB (the job's default shard size)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, the variants alternating")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "FILE", "DEST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    if args.mb < 1 or args.repeat < 1:
        parser.error("--mb and --repeat must be >= 1")

    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="fusmae-bench-upload-"))
    runs: list[dict[str, Any]] = []
    try:
        path = work / "shard.tar"
        with open(path, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1 << 20))
        with moto_server(work / "moto.log") as endpoint:
            env = {**os.environ, **S3_ENV, "AWS_ENDPOINT_URL": endpoint}
            os.environ.update(env)
            bucket = s3_bucket(endpoint).removeprefix("s3://")
            for r in range(args.repeat):
                for variant in VARIANTS:
                    out = subprocess.run([sys.executable, __file__, "--child", variant, str(path),
                                          f"{bucket}/{variant}-{r}.tar"], env=env, check=True, capture_output=True,
                                         text=True)
                    runs.append({"variant": variant, "round": r, **json.loads(out.stdout.strip().splitlines()[-1])})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    hw = hardware(packages=("s3fs", "botocore", "moto"))
    hw["load_avg_1m"] = f"{load_before} at start, {load_average()} at end"
    setup = {"file_mib": args.mb, "repeat": args.repeat, "store": "moto on loopback"}
    print_header("Uploading a shard to S3: memory and time", setup, hw)
    print("| upload | seconds (each round) | MB/s (best) | peak memory over before, MiB (each round) |")
    print("|---|---|---:|---|")
    best = {}
    for variant, label in VARIANTS.items():
        mine = [r for r in runs if r["variant"] == variant]
        best[variant] = min(mine, key=lambda r: r["seconds"])
        seconds = " / ".join(f"{r['seconds']:.2f}" for r in mine)
        memory = " / ".join(f"{r['peak_over_before'] / 2**20:.0f}" for r in mine)
        print(f"| {label} | {seconds} | {args.mb * 2**20 / 1e6 / best[variant]['seconds']:.0f} | {memory} |")
    peaks = [max(r["peak_over_before"] for r in runs if r["variant"] == v) for v in VARIANTS]
    print(f"\n- put_atomic / s3fs defaults: peak memory {peaks[1] / peaks[0]:.2f}x (largest of each), "
          f"time {best['put_atomic']['seconds'] / best['s3fs']['seconds']:.2f}x (best of each)")
    write_json(args.json, {"setup": setup, "hardware": hw, "runs": runs})


if __name__ == "__main__":
    main()
