"""Copying a shard into the loader's node cache (``data.cache_dir``): block after block on one connection, as
before, against ranged requests several at a time (`launch.data.reader.download_verified`, `DOWNLOAD_STREAMS`).

One connection to an object store carries ~50-100 MB/s, whatever the node's network; S3's guidance is parallel
byte-range fetches. A moto server on loopback has no such limit, so the store here is reached through the
project's proxy (`launch.demo.proxy.StoreProxy`) holding each connection's responses to ``--mbps`` MB/s, with
``--latency-ms`` added to each request. Each row downloads the same file of random bytes, checks its sha256 and
writes it to a local folder, as the loader's cache does; the rows alternate over ``--repeat`` rounds.

    python bench/bench_cache_download.py                  # 256 MiB at 40 MB/s a connection, ~2 min on 2 cores
    python bench/bench_cache_download.py --mb 64 --mbps 20 --repeat 1
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# Runnable as a plain script from any directory: the repository root holds `launch/`.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import S3_ENV, hardware, load_average, moto_server, print_header, s3_bucket, write_json  # noqa: E402
from launch.data.reader import DEFAULT_BLOCK_SIZE, DOWNLOAD_STREAMS, download_verified  # noqa: E402
from launch.demo.proxy import StoreProxy  # noqa: E402
from pipeline.manifest import ShardInfo  # noqa: E402


def sequential(fs: Any, path: str, shard: ShardInfo, dest: str) -> None:
    """The way before: the object read through s3fs's file, block after block, hashed and written."""
    sha = hashlib.sha256()
    with fs.open(path, "rb", block_size=DEFAULT_BLOCK_SIZE) as src, open(dest, "wb") as out:
        while chunk := src.read(DEFAULT_BLOCK_SIZE):
            sha.update(chunk)
            out.write(chunk)
    if sha.hexdigest() != shard.sha256:
        raise SystemExit(f"{path}: sha256 differs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=256, help="shard size in MiB")
    parser.add_argument("--mbps", type=float, default=40.0, help="MB/s each connection carries (the proxy's limit)")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="round trip the proxy adds to each request")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, DOWNLOAD_STREAMS, 8],
                        help="ranged requests in flight, one row each")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.mb < 1 or args.mbps <= 0 or args.latency_ms < 0 or args.repeat < 1 or min(args.streams) < 1:
        parser.error("--mb, --mbps, --repeat and --streams must be positive, --latency-ms >= 0")

    import s3fs

    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="fusmae-bench-cache-"))
    rows: list[dict[str, Any]] = []
    try:
        data = os.urandom(args.mb << 20)
        shard = ShardInfo("shard.tar", "shard.tar", 1, len(data), hashlib.sha256(data).hexdigest())
        with contextlib.ExitStack() as stack:
            endpoint = stack.enter_context(moto_server(work / "moto.log"))
            os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
            path = f"{s3_bucket(endpoint).removeprefix('s3://')}/shard.tar"
            s3fs.S3FileSystem(skip_instance_cache=True).pipe_file(path, data)
            del data
            up = urlparse(endpoint)
            proxy = stack.enter_context(StoreProxy((up.hostname, up.port)))
            proxy.bandwidth(args.mbps * 1e6)
            proxy.latency(args.latency_ms / 1000)
            fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=proxy.url)
            ways = [("sequential", None)] + [("ranged", n) for n in args.streams]
            for r in range(args.repeat):
                for way, streams in ways:
                    dest = work / f"{way}-{streams}.tar"
                    start = time.perf_counter()
                    if streams is None:
                        sequential(fs, path, shard, str(dest))
                    elif download_verified(fs, path, shard, str(dest), streams=streams) is not None:
                        raise SystemExit(f"{path}: did not check out")
                    seconds = time.perf_counter() - start
                    if dest.stat().st_size != shard.bytes:
                        raise SystemExit(f"{dest}: {dest.stat().st_size} bytes")
                    dest.unlink()
                    rows.append({"way": way, "streams": streams, "round": r, "seconds": seconds,
                                 "mb_per_s": shard.bytes / 1e6 / seconds})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    hw = hardware(packages=("s3fs", "moto"))
    hw["load_avg_1m"] = f"{load_before} at start, {load_average()} at end"
    setup = {"shard_mib": args.mb, "block_mib": DEFAULT_BLOCK_SIZE >> 20, "mb_per_s_per_connection": args.mbps,
             "latency_ms": args.latency_ms, "repeat": args.repeat,
             "store": "moto on loopback behind a proxy limiting each connection"}
    print_header("Copying a shard into the loader's node cache: one connection against ranged requests in parallel",
                 setup, hw)
    print("| download | requests in flight | seconds (each round) | MB/s (best) | best / sequential |")
    print("|---|---:|---|---:|---:|")
    best_seq = min(r["seconds"] for r in rows if r["way"] == "sequential")
    for way, streams in [("sequential", None)] + [("ranged", n) for n in args.streams]:
        mine = [r for r in rows if r["way"] == way and r["streams"] == streams]
        best = min(r["seconds"] for r in mine)
        label = ("s3fs file, 16 MiB blocks one after another (before)" if way == "sequential" else
                 "`download_verified`" + (" (the default)" if streams == DOWNLOAD_STREAMS else ""))
        each = " / ".join(f"{r['seconds']:.2f}" for r in mine)
        print(f"| {label} | {streams or 1} | {each} | {shard.bytes / 1e6 / best:.0f} | {best_seq / best:.2f}x |")
    print(f"\nEach connection is held to {args.mbps:g} MB/s and each request waits {args.latency_ms:g} ms more; moto "
          "and the proxy run on this machine's cores, which bound the parallel rows.")
    write_json(args.json, {"setup": setup, "hardware": hw, "rows": rows})


if __name__ == "__main__":
    main()
