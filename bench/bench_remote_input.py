"""Reading the Zarr releases from object storage: what a request's round trip costs a worker, and what the
read-ahead of `pipeline.sources.wds_zarr` and `pipeline.sources.ssl4eo_zarr` (``--read-ahead``,
`SourceOptions.read_ahead`) wins back.

A member of the release is one ranged request, and each request waits a round trip before its first byte
(tens of ms to S3 in the same region, more across regions): a worker that fetched each location when it
needed it would wait on the store for most of its time. Generates an SSL4EO-S12 v1.1 WebDataset archive
(S1GRD and S2L1C tars, 264 px, one zipped Zarr member per location and modality; with ``--source
ssl4eo-zarr`` the chunk-file layout instead, 64 locations a file, a chunk per location), uploads it to a moto S3
server on loopback, plans it once, then reads every sample in this process through the source's own
``read`` (samples decoded and discarded, as `bench_preprocess.py`'s floor does):

1. from the local copy (page cache warm): the read floor, no request at all;
2. from S3 through a proxy on loopback that holds every request for ``--latency-ms`` before relaying it,
   at each read-ahead depth of ``--depths`` (0: each location's two requests when it comes; N: batches of N
   locations, a batch's neighbouring members or chunks in one request of up to 8 MB).

Reported: samples/s and the ratio to the local floor, the bytes the proxy relayed and the GET requests the moto
server logged. The moto server runs on this machine's cores and
serves every byte through Python: at latency 0 it, not the reader, is what the S3 rows measure.

    python bench/bench_remote_input.py                                 # 256 samples, ~2 min on 2 cores
    python bench/bench_remote_input.py --latency-ms 0 30 --depths 0 4
    python bench/bench_remote_input.py --source ssl4eo-zarr           # the chunk files
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# Runnable as a plain script from any directory: the repository root holds `pipeline/`.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import hardware, load_average, moto_server, print_header, upload_archive, write_json  # noqa: E402
from launch.demo.proxy import StoreProxy  # noqa: E402
from pipeline.sources import SOURCES, Rejection, SourceOptions  # noqa: E402
from pipeline.sources.base import DEFAULT_READ_AHEAD  # noqa: E402
from pipeline.synthetic import make_ssl4eo_wds, make_ssl4eo_zarr  # noqa: E402

SIZE = 264
SEASONS = 4


def make_archive(source: str, root: Path, locations: int) -> None:
    """S1GRD and S2L1C of ``locations`` locations at 264 px in ``source``'s layout (64 locations a chunk file)."""
    if source == "ssl4eo-wds":
        make_ssl4eo_wds(root, splits={"train": 1}, samples_per_shard=locations, size=SIZE, products=("S1GRD", "S2L1C"))
    else:
        files = math.ceil(locations / 64)
        make_ssl4eo_zarr(root, splits={"train": files}, samples_per_file=math.ceil(locations / files), size=SIZE,
                         products=("S1GRD", "S2L1C"))


def read_all(url: str, items: Any, options: SourceOptions, source: str = "ssl4eo-wds") -> dict[str, Any]:
    """Every sample of ``items`` through the source's ``read``, decoded and discarded; timings."""
    src = SOURCES[source](url, options)
    samples = rejected = 0
    cpu, start = time.process_time(), time.perf_counter()
    for result in src.read(items, "train"):
        if isinstance(result, Rejection):
            rejected += 1
        else:
            samples += 1
    seconds = time.perf_counter() - start
    return {"samples": samples, "rejected": rejected, "seconds": seconds, "samples_per_s": samples / seconds,
            "cores_busy": (time.process_time() - cpu) / seconds}


_GET = re.compile(rb'"(?:\x1b\[[0-9;]*m)*GET /')
"""A GET in werkzeug's access log: '"GET /bucket/key HTTP/1.1" 206 -', a 206 coloured by ANSI codes."""


def get_requests(log: Path) -> int:
    """GET requests the moto server has logged so far."""
    with open(log, "rb") as f:
        return sum(1 for line in f if _GET.search(line))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="ssl4eo-wds", choices=["ssl4eo-wds", "ssl4eo-zarr"])
    parser.add_argument("--samples", type=int, default=256, help="samples to generate (locations x 4 seasons)")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 20.0, 50.0],
                        help="round trips the proxy adds to every request")
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 1, 4, 8],
                        help="read-ahead depths (locations fetched ahead, their two members at once on 2N threads)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.samples < 1 or min(args.depths) < 0 or min(args.latency_ms) < 0:
        parser.error("--samples must be >= 1, --depths and --latency-ms >= 0")

    load_before = load_average()
    work = Path(tempfile.mkdtemp(prefix="fusmae-bench-remote-"))
    try:
        locations = math.ceil(args.samples / SEASONS)
        start = time.perf_counter()
        make_archive(args.source, work / "archive", locations)
        generate_s = time.perf_counter() - start
        local_url = str(work / "archive")
        local_items, _ = SOURCES[args.source](local_url, SourceOptions()).plan("train", lambda f, a: [f(x) for x in a])
        read_all(local_url, local_items, SourceOptions(), args.source)  # warm-up: imports, page cache
        floor = read_all(local_url, local_items, SourceOptions(), args.source)

        rows = []
        with contextlib.ExitStack() as stack:
            log = work / "moto.log"  # the server's access log: a line per request
            endpoint = stack.enter_context(moto_server(log))
            url, upload_s = upload_archive(endpoint, work / "archive")
            up = urlparse(endpoint)
            proxy = stack.enter_context(StoreProxy((up.hostname, up.port)))
            remote = {"endpoint_url": proxy.url, "skip_instance_cache": True}
            items, _ = SOURCES[args.source](url, SourceOptions(storage_options=remote)).plan(
                "train", lambda f, a: [f(x) for x in a])
            for latency in args.latency_ms:
                proxy.latency(latency / 1000)
                for depth in args.depths:
                    proxy.reset()
                    before = get_requests(log)
                    row = read_all(url, items, SourceOptions(storage_options=remote, read_ahead=depth), args.source)
                    time.sleep(0.2)  # the server logs a request once it has answered it
                    row["get_requests"] = get_requests(log) - before
                    if row["samples"] != floor["samples"]:
                        sys.exit(f"read {row['samples']} samples from S3, {floor['samples']} locally")
                    row.update(latency_ms=latency, depth=depth, mb_received=proxy.received / 1e6,
                               over_floor=row["samples_per_s"] / floor["samples_per_s"])
                    rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    hw = hardware(packages=("numpy", "s3fs", "moto"))
    hw["load_avg_1m"] = f"{load_before} at start, {load_average()} at end"
    default_depth = DEFAULT_READ_AHEAD
    setup = {"source": args.source, "size_px": SIZE, "samples": floor["samples"], "locations": locations,
             "generate_s": round(generate_s, 1), "upload_s": round(upload_s, 1),
             "default_depth": default_depth, "store": "moto on loopback behind a latency proxy"}
    print_header(f"Reading {'the WebDataset release' if args.source == 'ssl4eo-wds' else 'the Zarr chunk files'} "
                 "from S3: round trips and read-ahead", setup, hw)
    print("| input | added round trip | read-ahead depth | s | samples/s | / local floor | MB from the store "
          "| GET requests | cores busy (this process) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| local disk (page cache) | – | – | {floor['seconds']:.2f} | {floor['samples_per_s']:.1f} | 1.00 | – | – "
          f"| {floor['cores_busy']:.2f} |")
    for r in rows:
        mark = " (default)" if r["depth"] == default_depth else ""
        print(f"| S3 | {r['latency_ms']:.0f} ms | {r['depth']}{mark} | {r['seconds']:.2f} | {r['samples_per_s']:.1f} "
              f"| {r['over_floor']:.2f} | {r['mb_received']:.0f} | {r['get_requests']} | {r['cores_busy']:.2f} |")
    if args.source == "ssl4eo-wds":
        what = ("A location is two members (its S1 and its S2 member). Depth 0: a ranged GET for each when the "
                "location comes.")
    else:
        what = ("A location is two chunks (its S1 and its S2 chunk). Depth 0: zipfile reads them when the location "
                "comes, through the file's 8 MB blocks.")
    what += (" Depth N: the next locations are fetched in batches of N on 2N threads (the next batch once a batch's "
             "first location is in), the pieces of a batch that lie side by side in their object in one ranged GET of "
             "up to 8 MB, while this location is decoded.")
    print("\nEach S3 row reads the same planned items (planning done once, without added latency). " + what +
          " GET requests: the moto server's access log. Cores busy counts this process only; the moto server and "
          "the proxy run on the same cores.")
    for latency in args.latency_ms:
        same = {r["depth"]: r for r in rows if r["latency_ms"] == latency}
        if 0 in same and default_depth in same and default_depth != 0:
            print(f"- {latency:.0f} ms: depth {default_depth} / depth 0 = "
                  f"{same[default_depth]['samples_per_s'] / same[0]['samples_per_s']:.2f}x")
    write_json(args.json, {"setup": setup, "hardware": hw, "floor": floor, "rows": rows})


if __name__ == "__main__":
    main()
